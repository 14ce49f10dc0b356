"""The loop's speed pieces (issue 8) change how fast a step runs, never what it computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib_lora.training import data as data_mod
from lib_lora.training import speed
from lib_lora.training.run import train


def _lora(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_cached_text_encoder_outputs_give_the_same_losses(tmp_path, bb, speed_cfg):
    def losses(**kw):
        events = []
        torch.manual_seed(0)  # the VAE samples its latents from torch's global RNG
        cfg = speed_cfg(tmp_path, train_text_encoder=False, log_every_n_steps=1, **kw)
        res = train(cfg, backbone=bb, on_event=events.append)
        return res, [e["loss"] for e in events if e["kind"] == "loss"]

    cached, a = losses(name="cached")
    plain, b = losses(name="plain", cache_text_encoder_outputs=False)
    assert len(a) == len(b) == 3
    # Same noise, same latents, same conditioning (to float rounding): the same losses.
    assert a == pytest.approx(b, rel=1e-4)
    ups = [k for k in _lora(cached.lora_path) if k.endswith("lora_up.weight")]
    assert any(_lora(cached.lora_path)[k].abs().sum() > 0 for k in ups)  # it trained


def test_chunk_cache_matches_the_text_encoder_for_mixed_lengths(tmp_path, bb, speed_cfg, ready_trainer):
    tr = ready_trainer(speed_cfg(tmp_path, train_text_encoder=False), bb)
    try:
        long = ", ".join(f"tag{i} word{i}" for i in range(60))  # > 75 tokens: two chunks
        captions = ["zhang, 1girl, smile", long]
        feeder = speed.StepFeeder(
            tr.state.latent_of, tr.state.tokens, tr.state.device, torch.Generator().manual_seed(0), 1000,
            encode_chunks=speed.text_chunk_encoder(tr.state.backbone, 1, tr.state.device, None),
        )  # fmt: skip
        ids, keys = feeder.ids(captions)
        n = ids.shape[1] // 77
        assert ids.shape == (2, n * 77) and n >= 2  # the long caption takes n chunks
        got = feeder.cond(ids, keys)
        with torch.no_grad():
            want = tr.state.backbone.encode_text(ids)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # n chunks of the long caption, 1 of the short one, and its empty padding chunk once
        assert len(feeder._cond) == n + 2
        again = feeder.cond(*feeder.ids(list(reversed(captions))))
        torch.testing.assert_close(again, want.flip(0), atol=1e-5, rtol=1e-5)
        assert len(feeder._cond) == n + 2
    finally:
        tr.close()


def test_feeder_draws_the_loops_noise_recipe(tmp_path, bb, speed_cfg, ready_trainer):
    tr = ready_trainer(speed_cfg(tmp_path, noise_offset=0.1), bb)
    try:
        batch = next(iter(data_mod.iter_batches(tr.state.dataset.items, tr.cfg, 1, 0)))
        d = tr.step_inputs(batch)
        gen = torch.Generator().manual_seed(tr.cfg.seed)
        lat = torch.stack([tr.state.latent_of[id(it)] for it in batch.items])
        noise = torch.randn(lat.shape, generator=gen)
        noise = noise + 0.1 * torch.randn((lat.shape[0], lat.shape[1], 1, 1), generator=gen)
        t = torch.randint(0, 1000, (lat.shape[0],), generator=gen)
        torch.testing.assert_close(d.latents, lat)
        torch.testing.assert_close(d.noise, noise)
        assert torch.equal(d.timesteps, t)
        assert d.cond is None  # the text encoder is trained: it must run every step
        assert torch.equal(d.ids, tr.state.tokens.batch(batch.captions))
    finally:
        tr.close()


def test_fused_adamw_steps_like_the_reference():
    kw = speed.adamw_kwargs("cpu")
    assert kw == {"fused": True}  # torch >= 2.4 has a fused CPU AdamW: else this compares the reference with itself
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(64, 32))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = torch.optim.AdamW([p1], lr=1e-2, weight_decay=0.01, **kw)
    o2 = torch.optim.AdamW([p2], lr=1e-2, weight_decay=0.01, foreach=False)
    for i in range(5):
        g = torch.randn(64, 32, generator=torch.Generator().manual_seed(i))
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)


def test_feeder_follows_a_reseeded_noise_generator(tmp_path, bb, speed_cfg, ready_trainer):
    """The LR probe runs steps, then build_optimizer re-seeds the noise: training must use the new one."""
    tr = ready_trainer(speed_cfg(tmp_path), bb)
    try:
        batch = next(iter(data_mod.iter_batches(tr.state.dataset.items, tr.cfg, 1, 0)))
        first = tr.step_inputs(batch)
        tr.step_inputs(batch)  # advance the generator, as probe steps would
        tr.build_optimizer()  # a fresh seeded generator
        again = tr.step_inputs(batch)
        torch.testing.assert_close(again.noise, first.noise)
        assert torch.equal(again.timesteps, first.timesteps)
    finally:
        tr.close()
