"""Numerical guards, out-of-memory handling and a full disk during a save."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from helpers_rel import DEV_FULL, full_disk, make_dataset, patch_torch_save, tiny_config

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
            schedule.append(tr.state.scheduler.last_epoch)

    tr = OOMTrainer(cfg2, on_event=on_event)
    res = tr.run()
    texts = [e.get("text", "") for e in seen]
    assert any("retrying with gradient checkpointing" in t for t in texts)
    assert any("retrying with the batch split in halves" in t for t in texts)
    assert res.lora_path.is_file() and res.steps == 3
    # The LoRA says how it was trained: with the checkpointing the retry turned on.
    assert res.metadata["ss_gradient_checkpointing"] == "True"
    assert json.loads(res.metadata["fastlora_config"])["gradient_checkpointing"] is True
    # The halves make one optimizer step between them: the LR schedule advanced once per step.
    assert schedule == [3]


def test_split_batch_gradient_is_the_whole_batch_gradient(tmp_path, bb, float32_rounding):
    """The out-of-memory split: each half's backward weighted by its share adds up to the
    gradient of the whole batch (same inputs), so the retried step is the same update."""
    # 128 px: the U-Net's middle block sees 2x2 latents. At 64 px it sees one position, where
    # self-attention's softmax is constant, so its q/k LoRAs have an exactly-zero gradient and
    # compare only rounding noise (~1e-12) with rounding noise.
    ds = make_dataset(tmp_path / "data", n=4, size=128)
    cfg = tiny_config(tmp_path, ds, batch_size=3, max_steps=2, network_dropout=0.0, resolution=128)
    tr = Trainer(cfg, bb)
    tr.load_all()
    try:
        from lib_lora.training import data as data_mod

        for name, p in tr.state.network.named_parameters():  # a trained-looking LoRA: with up = 0 the
            if "lora_up" in name:  # down weights get no gradient
                torch.nn.init.normal_(p, std=0.02)
        batch = next(iter(data_mod.iter_batches(tr.state.dataset.items, tr.cfg, 1, tr.cfg.seed)))
        assert len(batch.items) == 3
        d = tr.step_inputs(batch)

        def gradients(parts_and_weights):
            for p in tr.state.params:
                p.grad = None
            loss = 0.0
            for sl, w in parts_and_weights:
                part = type(d)(d.latents[sl], d.noise[sl], d.timesteps[sl], d.ids[sl],
                               None if d.cond is None else d.cond[sl])  # fmt: skip
                loss = loss + tr.backward(part, w) * w
            return [p.grad.clone() for p in tr.state.params], loss

        whole, whole_loss = gradients([(slice(0, 3), 1.0)])
        split, loss = gradients([(slice(0, 2), 2 / 3), (slice(2, 3), 1 / 3)])
        wrong, _ = gradients([(slice(0, 2), 1 / 2), (slice(2, 3), 1 / 2)])  # a wrong share
        # Both are the same sums in float32, computed with other batch sizes (other kernel
        # blocking) and in another order: they agree to the pass's rounding bound (1.4e-3;
        # measured <= 1e-5), while a wrong share is off by 8 % or more in every tensor.
        tol = float32_rounding(bb.unet, bb.text_encoder)
        for g, s, bad in zip(whole, split, wrong, strict=True):
            assert float(g.norm()) > 0  # no tensor with a structurally zero gradient
            assert float((s - g).norm()) <= tol * float(g.norm())
            assert float((bad - g).norm()) > 10 * tol * float(g.norm())  # the test sees a wrong weight
        assert abs(float(loss) - float(whole_loss)) <= tol * float(whole_loss)
    finally:
        tr.close()  # the shared model is left as it was


@pytest.mark.skipif(not DEV_FULL.exists(), reason="needs /dev/full (Linux)")
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
        return full_disk(real_save)(obj, f, *a, **k)

    patch_torch_save(monkeypatch, save_then_fill)
    with pytest.raises(UserError, match="disk (is|may be) full.*resumes"):
        train(cfg_b, backbone=bb)
    monkeypatch.setattr(torch, "save", real_save)
    st = state.load_state(state.state_path(cfg_b.run_dir))
    assert st["step"] == 2
    leftovers = [p for p in (tmp_path / "runs").rglob("*") if "fastlora-tmp" in p.name]
    assert leftovers == []

    # The disk fills during the export over an existing LoRA: the old file is untouched.
    real_save_file = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk(real_save_file, 1000))
    with pytest.raises(UserError, match="disk is full"):
        train(cfg, backbone=bb)
    assert first.lora_path.read_bytes() == lora_bytes
    assert [p for p in (tmp_path / "out").iterdir() if "fastlora-tmp" in p.name] == []
