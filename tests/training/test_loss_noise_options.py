"""kohya's loss and noise options (v-parameterization, zero terminal SNR, l1/huber/smooth_l1
with the huber schedule, min/max timestep, multires noise, random-strength noise offset),
each checked against its formula computed here independently (float64), on the loss the
training step returns and the noise and timesteps it draws.

The formulas are those of kohya-ss/sd-scripts: library/train_util.py
(get_noise_noisy_latents_and_timesteps, get_huber_threshold_if_needed, conditional_loss) and
library/custom_train_functions.py (fix_noise_scheduler_betas_for_zero_terminal_snr,
apply_snr_weight, pyramid_noise_like, apply_noise_offset)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib_lora.config import TrainConfig, validate
from lib_lora.errors import UserError
from lib_lora.training import data as data_mod
from lib_lora.training import loss as loss_mod
from lib_lora.training import noise as noise_mod
from lib_lora.training import schedule
from lib_lora.training.family import SD15
from lib_lora.training.run import Trainer, predict_with
from lib_lora.training.speed import split_conditioning

EPS32 = float(torch.finfo(torch.float32).eps)


def ddpm_alphas_cumprod() -> torch.Tensor:
    """SD's DDPM schedule in float64: scaled-linear betas 0.00085..0.012 over 1000 steps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def kohya_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The paper's algorithm 1 as kohya runs it: through the betas and back (float64 here)."""
    betas = 1 - torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    abar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    a0, aT = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - aT) * (a0 / (a0 - aT))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return torch.cumprod(alphas, 0)


# ---------------------------------------------------------------------------- the schedule


def test_zero_terminal_snr_rescale_is_kohyas():
    base = schedule.noise_schedule(SD15)
    got = schedule.training_schedule(SD15, zero_terminal_snr=True)
    want = kohya_zero_terminal_snr(base.double())
    # A few fp32 roundings (sqrt, subtract, scale, square) of values <= 1: well within 16 ulp of 1.
    torch.testing.assert_close(got.alphas_cumprod.double(), want, atol=16 * EPS32, rtol=0)
    assert got.alphas_cumprod[-1] == 0  # pure noise at the last timestep: SNR 0
    assert got.sqrt_1mac[-1] == 1
    assert abs(float(got.alphas_cumprod[0]) - float(base[0])) <= 4 * EPS32  # the first keeps its value
    # min-SNR weights from the schedule before the rescale, as kohya's all_snr (finite at T).
    torch.testing.assert_close(got.snr, base / (1 - base))
    plain = schedule.training_schedule(SD15)
    assert torch.equal(plain.alphas_cumprod, base) and torch.equal(plain.snr, got.snr)


def test_sampler_of_a_v_prediction_run_reads_v_on_the_rescaled_schedule():
    fam = schedule.for_run(SD15, v_parameterization=True, zero_terminal_snr=True)
    assert schedule.for_run(SD15) is SD15  # defaults: the family itself
    sched = schedule.ddim(20, fam)
    assert sched.config.prediction_type == "v_prediction"
    assert int(sched.timesteps[0]) == 999  # trailing spacing: sampling starts where the noise is pure
    # diffusers' own rescale (1000 fp32 products) against the loop's: <= 1000 roundings of values <= 1.
    train = schedule.training_schedule(SD15, zero_terminal_snr=True).alphas_cumprod
    torch.testing.assert_close(sched.alphas_cumprod.double(), train.double(), atol=1000 * EPS32, rtol=0)
    assert schedule.ddim(20, SD15).config.prediction_type == "epsilon"


def test_ddim_of_a_v_run_recovers_the_data_from_an_exact_v_model():
    """A model that knows the one data point x0 and predicts its exact v: DDIM on the v-schedule
    lands where x0 is noised to the schedule's first level (DDIM's last step, set_alpha_to_one
    off); read as noise (the epsilon schedule) the same outputs go elsewhere."""
    from lib_lora.training.sample import denoise

    x0 = torch.linspace(-1, 1, 16).view(1, 1, 4, 4).repeat(1, 4, 1, 1).double()
    fam = schedule.for_run(SD15, v_parameterization=True, zero_terminal_snr=True)
    ac = schedule.ddim(10, fam).alphas_cumprod.double()  # the sampler's own, so the model is exact for it

    def exact_v(x, t, cond):
        a = ac[t.long()].view(-1, 1, 1, 1)
        # x = sqrt(a) x0 + sqrt(1 - a) eps, and v = sqrt(a) eps - sqrt(1 - a) x0
        eps = (x.double() - a.sqrt() * x0) / (1 - a).sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).float()

    start = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(1, 1, 1)
    out = denoise(exact_v, cond, cond, start, steps=10, cfg_scale=1.0, family=fam)
    # From pure noise (t = 999, SNR 0) the exact model's x0 estimate is x0 at every step, and the
    # noise estimate is the start noise: DDIM ends at sqrt(a_0) x0 + sqrt(1 - a_0) start.
    want = ac[0].sqrt() * x0 + (1 - ac[0]).sqrt() * start.double()
    # 10 fp32 DDIM steps on values of size ~3: well within 1e-5.
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    wrong = denoise(exact_v, cond, cond, start, steps=10, cfg_scale=1.0, family=SD15)
    assert (wrong.double() - want).abs().max() > 0.1


# ---------------------------------------------------------------------------- the loss formulas


def _pairs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred, lat, noise = (torch.randn(b, 4, 8, 8, generator=g) for _ in range(3))
    return pred, lat, noise, torch.tensor([0, 480, 999])[:b]


@pytest.mark.parametrize(("kind", "huber_schedule"), [("l2", "snr"), ("l1", "snr")] + [
    (k, h) for k in ("huber", "smooth_l1") for h in ("constant", "exponential", "snr")])  # fmt: skip
def test_loss_types_and_huber_schedule(kind, huber_schedule):
    pred, lat, noise, t = _pairs()
    c0 = 0.2
    spec = loss_mod.LossSpec(loss_type=kind, huber_schedule=huber_schedule, huber_c=c0)
    sched = schedule.training_schedule(SD15)
    got = loss_mod.per_sample_loss(pred, lat, noise, t, spec, sched)
    ac = ddpm_alphas_cumprod()[t]
    c = {"constant": torch.full((3,), c0, dtype=torch.float64),
         "exponential": c0 ** (t.double() / 1000),  # 1 at t=0, c at t=T: exp(-(-ln c / T) t)
         "snr": (1 - c0) / (1 + ((1 - ac) / ac).sqrt()) ** 2 + c0}[huber_schedule].view(-1, 1, 1, 1)
    d = pred.double() - noise.double()
    el = {"l2": d**2, "l1": d.abs(), "huber": 2 * c * ((d**2 + c**2).sqrt() - c),
          "smooth_l1": 2 * ((d**2 + c**2).sqrt() - c)}[kind]
    want = el.mean(dim=(1, 2, 3))
    # fp32 elementwise and a mean of 256 values: relative error within a few hundred ulp.
    torch.testing.assert_close(got.double(), want, rtol=256 * EPS32, atol=0)
    if kind == "huber":  # quadratic for small errors, linear for large: d^2 when |d| << c
        def huber(d, c):
            return float(loss_mod.elementwise_loss(torch.tensor([d]), torch.tensor([0.0]), "huber", torch.tensor([c])))

        # 2c(sqrt(d^2 + c^2) - c) = d^2 (1 - d^2/(4c^2) + ...): 0.25 % below d^2 at d = c/10.
        assert huber(0.1, 1.0) == pytest.approx(0.01, rel=5e-3)
        assert huber(100.0, 0.1) == pytest.approx(2 * 0.1 * 100, rel=2e-3)  # 2c|d| - 2c^2


@pytest.mark.parametrize("v", [False, True])
def test_v_target_and_min_snr_weight(v):
    pred, lat, noise, t = _pairs()
    gamma = 5.0
    sched = schedule.training_schedule(SD15, zero_terminal_snr=v)
    spec = loss_mod.LossSpec(v_parameterization=v, min_snr_gamma=gamma)
    got = loss_mod.per_sample_loss(pred, lat, noise, t, spec, sched)
    base = ddpm_alphas_cumprod()
    ac = (kohya_zero_terminal_snr(base) if v else base)[t].view(-1, 1, 1, 1)
    target = ac.sqrt() * noise.double() - (1 - ac).sqrt() * lat.double() if v else noise.double()
    snr = (base / (1 - base))[t]  # kohya's all_snr: before the rescale
    weight = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / (snr + 1 if v else snr)
    want = ((pred.double() - target) ** 2).mean(dim=(1, 2, 3)) * weight
    # fp32 schedule (1000-factor cumprod: relative error up to ~1e-4 at t=999) against float64.
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=0)
    assert torch.isfinite(got).all()  # the rescaled SNR is 0 at t=999; the weights stay finite


def test_options_are_validated():
    with pytest.raises(UserError, match="min_timestep = 500 is above max_timestep = 100"):
        validate(TrainConfig(min_timestep=500, max_timestep=100))
    with pytest.raises(UserError, match="huber_c = 0.0"):
        validate(TrainConfig(loss_type="huber", huber_c=0.0))
    with pytest.raises(UserError, match="loss_type"):
        validate(TrainConfig(loss_type="mse"))
    with pytest.raises(UserError, match="max_timestep = 1001 is above its maximum"):
        validate(TrainConfig(max_timestep=1001))


# ---------------------------------------------------------------------------- noise and timesteps


def test_default_recipe_draws_exactly_the_old_sequence():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noise, t = noise_mod.draw(noise_mod.NoiseRecipe(noise_offset=0.1), (2, 4, 8, 8), g1)
    want = torch.randn((2, 4, 8, 8), generator=g2)
    want += 0.1 * torch.randn((2, 4, 1, 1), generator=g2)
    assert torch.equal(noise, want) and torch.equal(t, torch.randint(0, 1000, (2,), generator=g2))


def test_timestep_range_random_strength_and_multires_noise():
    shape = (2, 4, 16, 12)
    recipe = noise_mod.NoiseRecipe(noise_offset=0.1, offset_random_strength=True, multires_iterations=6,
                                   multires_discount=0.3, min_timestep=200, max_timestep=300)  # fmt: skip
    noise, t = noise_mod.draw(recipe, shape, torch.Generator().manual_seed(9))
    # The same draws, in kohya's order: noise, the offset's strength, the offset, the octaves, timesteps.
    g = torch.Generator().manual_seed(9)
    want = torch.randn(shape, generator=g, dtype=torch.float32).double()
    strength = float(torch.rand(1, generator=g)) * 0.1
    want = want + strength * torch.randn((2, 4, 1, 1), generator=g).double()
    h, w = shape[2:]
    for i in range(6):
        r = float(torch.rand((), generator=g)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        low = torch.randn((2, 4, hn, wn), generator=g).double()
        want = want + F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) * 0.3**i
        if hn == 1 or wn == 1:
            break
    want = want / want.std()
    # fp32 sums of <= 7 octaves of unit-size values, then one division: a few dozen ulp.
    torch.testing.assert_close(noise.double(), want, atol=64 * EPS32, rtol=0)
    assert abs(float(noise.std()) - 1) < 16 * EPS32
    assert torch.equal(t, torch.randint(200, 300, (2,), generator=g))
    # Over many draws every timestep lands in [min, max).
    g = torch.Generator().manual_seed(1)
    ts = torch.cat([noise_mod.draw(recipe, (4, 4, 2, 2), g)[1] for _ in range(200)])
    assert int(ts.min()) >= 200 and int(ts.max()) <= 299 and len(set(ts.tolist())) > 80
    one = noise_mod.NoiseRecipe(min_timestep=500, max_timestep=500)  # kohya: min = max trains that step
    assert noise_mod.draw(one, (3, 4, 2, 2), g)[1].tolist() == [500, 500, 500]


# ---------------------------------------------------------------------------- the training step


def _trainer(tmp_path, dataset, bb, **kw) -> Trainer:
    base = dict(name="lossopt", dataset=str(dataset), output_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"),
                resolution=64, min_bucket_reso=64, max_bucket_reso=128, dim=4, alpha=4.0, lr="1e-3",
                optimizer="adamw", lr_scheduler="constant", device="cpu", max_steps=4, log_every_n_steps=1,
                save_precision="fp32", seed=3, batch_size=2)  # fmt: skip
    base.update(kw)
    tr = Trainer(TrainConfig(**base), backbone=bb)
    tr.state.session_id = "test"
    tr.load_all()
    return tr


def step_loss_by_formula(tr: Trainer, d, ac: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The step's loss from the formulas (float64), on the U-Net's prediction of the step's
    inputs noised with `ac` (the expected schedule, computed independently)."""
    cfg, s = tr.cfg, tr.state
    a = ac[d.timesteps].view(-1, 1, 1, 1)
    noisy = (a.sqrt() * d.latents.double() + (1 - a).sqrt() * d.noise.double()).float()
    with torch.no_grad():
        cond, pooled = split_conditioning(s.backbone.encode_text(d.ids, clip_skip=cfg.clip_skip))
        pred = predict_with(s.backbone.predict_noise, s.backbone, noisy, d.timesteps, cond, pooled, None).double()
    target = a.sqrt() * d.noise.double() - (1 - a).sqrt() * d.latents.double() if cfg.v_parameterization \
        else d.noise.double()
    diff = pred - target
    if cfg.loss_type == "huber":
        c0, T = cfg.huber_c, 1000
        c = (c0 ** (d.timesteps.double() / T)).view(-1, 1, 1, 1)  # the exponential schedule
        el = 2 * c * ((diff**2 + c**2).sqrt() - c)
    else:
        el = diff**2
    if mask is not None:
        el = el * mask.double()
    loss = el.mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma:
        base = ddpm_alphas_cumprod()
        snr = (base / (1 - base))[d.timesteps]
        loss = loss * torch.clamp(snr, max=cfg.min_snr_gamma) / (snr + 1 if cfg.v_parameterization else snr)
    return loss.mean()


@pytest.mark.parametrize("options", [
    {},
    {"v_parameterization": True, "zero_terminal_snr": True, "min_snr_gamma": 5.0},
    {"loss_type": "huber", "huber_schedule": "exponential", "huber_c": 0.3, "min_timestep": 900},
])  # fmt: skip
def test_training_step_loss_is_the_formula(tmp_path, drawn_dataset, tiny_backbone, options):
    tr = _trainer(tmp_path, drawn_dataset, tiny_backbone, **options)
    try:
        batch = next(iter(data_mod.iter_batches(tr.state.dataset.items, tr.cfg, 1, tr.cfg.seed)))
        d = tr.step_inputs(batch)
        if options.get("min_timestep"):
            assert int(d.timesteps.min()) >= 900
        got = float(tr.backward(d))
        base = ddpm_alphas_cumprod()
        ac = kohya_zero_terminal_snr(base) if tr.cfg.zero_terminal_snr else base
        want = float(step_loss_by_formula(tr, d, ac))
        # fp32 schedule and U-Net against a float64 formula on the same inputs: the schedule's
        # cumprod (~1e-4 relative at worst) bounds it.
        assert got == pytest.approx(want, rel=5e-4)
        # The fixed-pairs loss is the same loss: with v on, it is not the epsilon MSE any more.
        fixed = tr.fixed_loss(timesteps=(500,))
        assert math.isfinite(fixed)
    finally:
        tr.close()


def test_fixed_loss_uses_the_training_loss(tmp_path, drawn_dataset, tiny_backbone):
    eps = _trainer(tmp_path / "e", drawn_dataset, tiny_backbone)
    v = _trainer(tmp_path / "v", drawn_dataset, tiny_backbone, v_parameterization=True)
    try:
        a, b = eps.fixed_loss(timesteps=(700,)), v.fixed_loss(timesteps=(700,))
        # Same LoRA init (seeded), same pairs; only the target differs (noise vs velocity).
        assert a != pytest.approx(b, rel=1e-3)
        s = v.state
        gen = torch.Generator("cpu").manual_seed(1234)
        total = 0.0
        for it in s.dataset.items:
            lat = s.latent_of[id(it)].unsqueeze(0)
            noise = torch.randn(lat.shape, generator=gen)
            d = type("D", (), {})()
            d.latents, d.noise, d.timesteps, d.ids = lat, noise, torch.tensor([700]), s.tokens.batch([it.caption])
            total += float(step_loss_by_formula(v, d, ddpm_alphas_cumprod()))
        assert b == pytest.approx(total / len(s.dataset.items), rel=5e-4)
    finally:
        eps.close()
        v.close()


def test_metadata_of_the_options(tmp_path, drawn_dataset, tiny_backbone):
    from lib_lora.training.export import read_lora
    from lib_lora.training.run import train

    kw = dict(name="v_md", dataset=str(drawn_dataset), output_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "r"),
              resolution=64, dim=4, alpha=4.0, lr="1e-3", optimizer="adamw", device="cpu", max_steps=2)
    md = read_lora(train(TrainConfig(**kw, v_parameterization=True, zero_terminal_snr=True, loss_type="smooth_l1",
                                     huber_schedule="constant", huber_c=0.2, min_timestep=100, max_timestep=900,
                                     multires_noise_iterations=6, multires_noise_discount=0.25, noise_offset=0.05,
                                     noise_offset_random_strength=True),
                         backbone=tiny_backbone).lora_path)[1]  # fmt: skip
    assert md["ss_base_model_version"] == "sd_v1_v" and md["ss_v2"] == "False"
    assert md["modelspec.prediction_type"] == "v"
    assert md["modelspec.timestep_range"] == "100,900"
    assert (md["ss_zero_terminal_snr"], md["ss_loss_type"], md["ss_huber_schedule"], md["ss_huber_c"],
            md["ss_huber_scale"]) == ("True", "smooth_l1", "constant", "0.2", "1.0")  # fmt: skip
    assert (md["ss_multires_noise_iterations"], md["ss_multires_noise_discount"],
            md["ss_noise_offset_random_strength"]) == ("6", "0.25", "True")  # fmt: skip
    plain = read_lora(train(TrainConfig(**{**kw, "name": "plain_md"}), backbone=tiny_backbone).lora_path)[1]
    # kohya's values for a run without the options.
    assert plain["ss_base_model_version"] == "sd_v1" and plain["modelspec.prediction_type"] == "epsilon"
    assert "modelspec.timestep_range" not in plain
    assert (plain["ss_zero_terminal_snr"], plain["ss_loss_type"], plain["ss_huber_schedule"], plain["ss_huber_c"],
            plain["ss_multires_noise_iterations"], plain["ss_multires_noise_discount"],
            plain["ss_noise_offset_random_strength"]) == ("False", "l2", "snr", "0.1", "None", "0.3", "False")


def test_samples_of_a_v_run_sample_with_v(tmp_path, drawn_dataset, tiny_backbone, monkeypatch):
    """The run's sample images go through DDIM on the run's schedule (observed, not replaced)."""
    from lib_lora.training import sample as sample_mod

    seen = []
    real = sample_mod.ddim

    def recording(steps, family):
        seen.append(family.schedule)
        return real(steps, family)

    monkeypatch.setattr(sample_mod, "ddim", recording)
    tr = _trainer(tmp_path, drawn_dataset, tiny_backbone, v_parameterization=True, zero_terminal_snr=True,
                  sample_steps=2)  # fmt: skip
    try:
        tr.make_samples()
    finally:
        tr.close()
    assert seen and all(s.prediction_type == "v_prediction" and s.zero_terminal_snr for s in seen)
    assert list((tmp_path / "run" / "samples").glob("*.png"))


def test_zero_terminal_snr_without_v_warns(tmp_path, drawn_dataset, tiny_backbone):
    events = []
    cfg = TrainConfig(name="z", dataset=str(drawn_dataset), output_dir=str(tmp_path / "o"), run_dir=str(tmp_path / "r"),
                      resolution=64, dim=4, lr="1e-3", optimizer="adamw", device="cpu", max_steps=1,
                      zero_terminal_snr=True)  # fmt: skip
    tr = Trainer(cfg, backbone=tiny_backbone, on_event=events.append)
    try:
        tr.load_all(optimizer=False)
    finally:
        tr.close()
    assert any(e.get("level") == "warning" and "--v-parameterization" in e["text"] for e in events)


def test_every_option_is_a_cli_flag():
    import argparse

    from lib_lora.config import add_arguments, from_args

    p = argparse.ArgumentParser()
    add_arguments(p, TrainConfig)
    ns = p.parse_args(["--v-parameterization", "--zero-terminal-snr", "--loss-type", "huber", "--huber-schedule",
                       "constant", "--huber-c", "0.2", "--min-timestep", "10", "--max-timestep", "990",
                       "--multires-noise-iterations", "8", "--multires-noise-discount", "0.4",
                       "--noise-offset-random-strength", "--masked-loss"])  # fmt: skip
    cfg = from_args(TrainConfig, ns)
    assert (cfg.v_parameterization, cfg.zero_terminal_snr, cfg.loss_type, cfg.huber_schedule, cfg.huber_c,
            cfg.min_timestep, cfg.max_timestep, cfg.multires_noise_iterations, cfg.multires_noise_discount,
            cfg.noise_offset_random_strength, cfg.masked_loss) == (
        True, True, "huber", "constant", 0.2, 10, 990, 8, 0.4, True, True)  # fmt: skip
    assert np.isclose(cfg.huber_c, 0.2)


def test_lr_probe_trains_with_the_same_loss(tmp_path, drawn_dataset, tiny_backbone):
    """The probe's first step and the training's first step see the same batch, noise and LoRA
    (the probe puts them back): with v-prediction and huber on, their losses are equal."""
    from lib_lora.training.run import train

    events = []
    cfg = TrainConfig(name="probe_v", dataset=str(drawn_dataset), output_dir=str(tmp_path / "o"),
                      run_dir=str(tmp_path / "r"), resolution=64, dim=4, alpha=4.0, lr="auto", optimizer="adamw",
                      lr_scheduler="constant", device="cpu", max_steps=2, log_every_n_steps=1, probe_min_steps=10,
                      probe_max_steps=10, v_parameterization=True, loss_type="huber", min_snr_gamma=5.0)  # fmt: skip
    train(cfg, backbone=tiny_backbone, on_event=events.append)
    probe = [e["loss"] for e in events if e["kind"] == "probe"]
    trained = [e["loss"] for e in events if e["kind"] == "loss"]
    assert probe and trained and probe[0] == trained[0]
