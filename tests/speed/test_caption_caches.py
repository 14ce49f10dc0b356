"""The caption caches (token ids, text-encoder outputs) pay off when a caption comes back every
epoch, and are left empty when captions are shuffled: then each one is new, and caching it
would only grow memory. Counted in tokenizer and text-encoder calls, never timed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lib_lora.training import data as data_mod

STEPS = 60  # 3 images x 2 repeats: 10 epochs


class Counting:
    """Calls `fn` and counts the calls (the tokenizer and the text encoder are not under test)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _run_steps(tr, monkeypatch) -> tuple[Counting, Counting]:
    """Prepare STEPS steps' inputs; (tokenizer calls, text-encoder calls)."""
    tokenize = Counting(tr.state.tokens.tokenizer)
    encode = Counting(tr.state.backbone.encode_text)
    monkeypatch.setattr(tr.state.tokens, "tokenizer", tokenize)
    monkeypatch.setattr(tr.state.backbone, "encode_text", encode)
    for batch in data_mod.iter_batches(tr.state.dataset.items, tr.cfg, STEPS, tr.cfg.seed):
        tr.step_inputs(batch)
    return tokenize, encode


def test_fixed_captions_are_tokenized_and_encoded_once(tmp_path, bb, speed_cfg, ready_trainer, monkeypatch):
    tr = ready_trainer(speed_cfg(tmp_path, train_text_encoder=False, max_steps=STEPS), bb)
    try:
        tokenize, encode = _run_steps(tr, monkeypatch)
        n = len({it.caption for it in tr.state.dataset.items})  # two of the three images share one
        assert n >= 2
        assert tokenize.calls == n and encode.calls == n  # once per caption, then hits
        assert len(tr.state.feeder._ids) == len(tr.state.feeder._cond) == len(tr.state.tokens._cache) == n
    finally:
        tr.close()


def test_shuffled_captions_fill_no_cache(tmp_path, bb, speed_cfg, ready_trainer, monkeypatch):
    tr = ready_trainer(speed_cfg(tmp_path, train_text_encoder=False, max_steps=STEPS, shuffle_caption=True), bb)
    try:
        tokenize, _ = _run_steps(tr, monkeypatch)
        assert tokenize.calls == STEPS  # a shuffled caption is tokenized when it is used
        # before: an entry per new shuffle in each (here up to 72 distinct ones), never bounded
        # by the dataset; now nothing is kept
        assert tr.state.feeder._ids == {} and tr.state.feeder._cond == {} and tr.state.tokens._cache == {}
    finally:
        tr.close()


def test_a_long_shuffled_caption_counts_as_one_cut_caption(tmp_path, bb, speed_cfg, ready_trainer):
    cfg = speed_cfg(tmp_path, max_steps=STEPS, shuffle_caption=True)
    long = "zhang, " + ", ".join(f"tag{i} word{i}" for i in range(150))  # > 225 tokens
    (Path(cfg.dataset) / "2_zhang" / "0.txt").write_text(long, encoding="utf-8")
    tr = ready_trainer(cfg, bb)
    try:
        for batch in data_mod.iter_batches(tr.state.dataset.items, tr.cfg, STEPS, tr.cfg.seed):
            tr.step_inputs(batch)
        # before: one per distinct shuffle of it (the run's end message counted ~20 captions)
        assert len(tr.state.tokens.truncated) == 1
    finally:
        tr.close()


def test_batches_of_fixed_captions_hit_per_caption(tmp_path, bb, speed_cfg, ready_trainer, monkeypatch):
    """8 images at batch 4: the same 4 captions in the same order almost never come back, each
    caption does every epoch, so ids are made once per caption (before: once per batch)."""
    sub = tmp_path / "eight" / "1_zhang"
    sub.mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (64, 64), (30 * i, 100, 200 - 20 * i)).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(f"zhang, tag{i}", encoding="utf-8")
    cfg = speed_cfg(tmp_path, dataset=str(tmp_path / "eight"), batch_size=4, train_text_encoder=False, max_steps=STEPS)
    tr = ready_trainer(cfg, bb)
    try:
        made = Counting(tr.state.tokens.batch)
        monkeypatch.setattr(tr.state.tokens, "batch", made)
        for batch in data_mod.iter_batches(tr.state.dataset.items, tr.cfg, STEPS, tr.cfg.seed):
            tr.step_inputs(batch)
        assert made.calls == 8 and len(tr.state.feeder._ids) == 8  # before: once per batch, 59 of 60
    finally:
        tr.close()


@pytest.mark.parametrize("shuffle,batch_size", [(False, 1), (False, 3), (True, 3)])
def test_cached_or_not_the_inputs_are_the_captions(tmp_path, bb, speed_cfg, ready_trainer, shuffle, batch_size):
    cfg = speed_cfg(tmp_path, train_text_encoder=False, shuffle_caption=shuffle, batch_size=batch_size)
    long = "zhang, " + ", ".join(f"tag{i} word{i}" for i in range(40))  # 2 chunks: the others are padded
    (Path(cfg.dataset) / "2_zhang" / "0.txt").write_text(long, encoding="utf-8")
    tr = ready_trainer(cfg, bb)
    try:
        for batch in data_mod.iter_batches(tr.state.dataset.items, tr.cfg, 12, tr.cfg.seed):
            d = tr.step_inputs(batch)
            plain = data_mod.CaptionTokens(bb.tokenizer).batch(batch.captions)
            assert d.ids.equal(plain)
            if d.cond is not None:
                with torch.no_grad():
                    torch.testing.assert_close(d.cond, bb.encode_text(plain), atol=1e-5, rtol=1e-5)
        assert shuffle or tr.state.feeder._cond  # fixed captions: the text-encoder cache was used
    finally:
        tr.close()
