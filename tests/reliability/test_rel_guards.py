"""Numerical guards, out-of-memory handling and a full disk during a save."""

from __future__ import annotations

import errno

import pytest
import safetensors.torch
import torch
from helpers_rel import make_dataset, tiny_config

from lib_lora.errors import UserError
from lib_lora.training import guards, state
from lib_lora.training.run import Trainer, train


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, bb):
    ds = make_dataset(tmp_path / "data")
    # An absurd learning rate drives the activations to inf/NaN within a few steps.
    cfg = tiny_config(tmp_path, ds, lr="1e12", max_grad_norm=0.0, max_steps=60, state_every_n_steps=1,
                      max_nonfinite_steps=3, network_dropout=0.0, lr_scheduler="constant")  # fmt: skip
    with pytest.raises(guards.NonFiniteError, match="(?i)in a row.*lower the learning rate"):
        train(cfg, backbone=bb)
    assert not (tmp_path / "out" / "rel.safetensors").exists()  # a broken LoRA is never exported
    st = state.load_state(state.state_path(cfg.run_dir))
    assert st["step"] >= 1
    assert all(torch.isfinite(v).all() for v in st["network"].values())  # the last good state


class OOMTrainer(Trainer):
    """Raises the exception torch raises on CUDA out-of-memory for batches of 2 or more."""

    calls = 0

    def train_step(self, batch):
        OOMTrainer.calls += 1
        if len(batch.items) >= 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().train_step(batch)


def test_out_of_memory_message_and_retries(tmp_path):
    ds = make_dataset(tmp_path / "data", n=4)
    cfg = tiny_config(tmp_path, ds, batch_size=2, max_steps=3, oom_retry=False)
    with pytest.raises(guards.OutOfMemory, match=r"step 1 \(batch 2 at 64x64, .*--oom-retry"):
        OOMTrainer(cfg).run()

    seen = []
    cfg2 = tiny_config(tmp_path, ds, name="rel2", batch_size=2, max_steps=3)  # retries are the default
    schedule = []  # the LR schedule's step count when the final LoRA is saved (the run lets go of it after)

    def on_event(ev):
        seen.append(ev)
        if ev["kind"] == "saved":
            schedule.append(tr.scheduler.last_epoch)

    tr = OOMTrainer(cfg2, on_event=on_event)
    res = tr.run()
    texts = [e.get("text", "") for e in seen]
    assert any("retrying with gradient checkpointing" in t for t in texts)
    assert any("retrying with the batch split in halves" in t for t in texts)
    assert res.lora_path.is_file() and res.steps == 3
    # The halves make one optimizer step between them: the LR schedule advanced once per step.
    assert schedule == [3]


def test_split_batch_gradient_is_the_whole_batch_gradient(tmp_path, bb):
    """The out-of-memory split: each half's backward weighted by its share adds up to the
    gradient of the whole batch (same inputs), so the retried step is the same update."""
    ds = make_dataset(tmp_path / "data", n=4)
    tr = Trainer(tiny_config(tmp_path, ds, batch_size=3, max_steps=2, network_dropout=0.0), bb)
    tr.load_all()
    try:
        nn = torch.nn
        for p in tr.params:  # a trained-looking LoRA: with up = 0 the down weights get no gradient
            nn.init.normal_(p, std=0.02)
        from lib_lora.training import data as data_mod

        batch = next(iter(data_mod.iter_batches(tr.dataset.items, tr.cfg, 1, tr.cfg.seed)))
        assert len(batch.items) == 3
        d = tr.step_inputs(batch)
        whole_loss = tr.backward(d)
        whole = [p.grad.clone() for p in tr.params]
        for p in tr.params:
            p.grad = None
        parts = [slice(0, 2), slice(2, 3)]
        loss = 0.0
        for sl in parts:
            part = type(d)(d.latents[sl], d.noise[sl], d.timesteps[sl], d.ids[sl], None if d.cond is None else d.cond[sl])
            share = (sl.stop - sl.start) / 3
            loss = loss + tr.backward(part, share) * share
        # Batched kernels round differently (the U-Net's output differs by ~1e-6 between a batch of
        # 3 and of 1), which reaches ~1e-3 of the largest gradient; a wrong weight is off by 50 %.
        for p, g in zip(tr.params, whole, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=2e-3 * float(g.abs().max()))
        torch.testing.assert_close(loss, whole_loss)
        assert any(g.abs().sum() > 0 for g in whole)
    finally:
        tr.close()  # the shared model is left as it was


def _full_disk_after(nbytes: int):
    """A writer that puts `nbytes` into the file and then fails as a full disk does."""

    def write(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def test_full_disk_keeps_the_previous_state_and_lora(tmp_path, monkeypatch, bb):
    ds = make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, ds, max_steps=4, state_every_n_steps=2, overwrite=True)
    first = train(cfg, backbone=bb)
    lora_bytes = first.lora_path.read_bytes()

    # The disk fills while the state is written: the previous state stays, the message says what to do.
    cfg_b = tiny_config(tmp_path, ds, name="relb", max_steps=4, state_every_n_steps=2)
    real_save = torch.save
    calls = {"n": 0}

    def save_then_fill(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_save(obj, f, *a, **k)
        return _full_disk_after(4096)(obj, f)

    monkeypatch.setattr(torch, "save", save_then_fill)
    with pytest.raises(UserError, match="Free disk space.*resume"):
        train(cfg_b, backbone=bb)
    monkeypatch.setattr(torch, "save", real_save)
    st = state.load_state(state.state_path(cfg_b.run_dir))
    assert st["step"] == 2
    leftovers = [p for p in (tmp_path / "runs").rglob("*") if "fastlora-tmp" in p.name]
    assert leftovers == []

    # The disk fills during the export over an existing LoRA: the old file is untouched.
    monkeypatch.setattr(safetensors.torch, "save_file", lambda t, f, metadata=None: _full_disk_after(1000)(t, f))
    with pytest.raises(UserError, match="disk"):
        train(cfg, backbone=bb)
    assert first.lora_path.read_bytes() == lora_bytes
    assert [p for p in (tmp_path / "out").iterdir() if "fastlora-tmp" in p.name] == []
