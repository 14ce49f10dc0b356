"""The LR probe (`--lr auto`): detector, reported value, exact reset, visible outputs.

Runs on the tiny model; the values found here are not values for SD1.5.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lib_lora.config import TrainConfig
from lib_lora.training import probe
from lib_lora.training.export import read_lora
from lib_lora.training.run import Trainer, train

# Two runs compared byte for byte: one torch thread (see tests/conftest.py one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_data")
    sub = root / "2_alice"
    sub.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(f"alice, photo {i}", encoding="utf-8")
    return root


def _cfg(dataset, tmp, name, **kw):
    base = dict(
        name=name, dataset=str(dataset), output_dir=str(tmp / "out"), run_dir=str(tmp / name), resolution=64,
        dim=4, alpha=2.0, max_steps=4, lr="auto", probe_min_steps=6, probe_max_steps=6, probe_window=3,
        log_every_n_steps=2, cache_latents_to_disk=False, seed=42,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------ pure parts
def test_detector_stops_on_a_settling_curve_and_runs_to_budget_otherwise():
    # D-Adaptation-like: grows from d0 in steps, then flat.
    settling = [1e-6 * 2**min(i, 12) for i in range(40)]
    steps, settled = probe.stop_step(settling, budget=100, window=10, tolerance=0.01)
    assert settled and steps == 12 + 10  # the first 10-step window after the last rise (step 13)
    assert settling[steps - 1] == pytest.approx(1e-6 * 2**12)
    # Still rising by 2% a step: never settles, runs to the budget.
    rising = [1e-6 * 1.02**i for i in range(200)]
    assert probe.stop_step(rising, budget=50, window=10, tolerance=0.01) == (50, False)
    # Flat from the start (d has not begun to adapt) is not "settled".
    assert probe.stop_step([1e-6] * 30, budget=30, window=5, tolerance=0.01) == (30, False)
    assert not probe.is_settled([1e-6, 1e-4, float("nan"), 1e-4, 1e-4], window=3, tolerance=0.01)


def test_budget_is_a_fraction_with_floor_and_cap():
    assert probe.probe_budget(1050, 0.05, 30, 300) == 53  # the tutorial's ~5% of 1050 steps
    assert probe.probe_budget(100, 0.05, 30, 300) == 30
    assert probe.probe_budget(100_000, 0.05, 30, 300) == 300


# ------------------------------------------------------------------------------ on the tiny model
def test_reported_value_is_the_optimizers_d_lr_and_weights_are_reset(dataset, tmp_path, tiny_backbone):
    cfg = _cfg(dataset, tmp_path, "reset", probe_max_steps=5, probe_min_steps=5)
    tr = Trainer(cfg, backbone=tiny_backbone)
    tr.state.started_at = 0.0
    tr.state.name = cfg.name
    tr.prepare_run_dir()
    tr.load_data()
    tr.load_model()
    tr.cache_latents()
    try:
        tr.build_network()
        initial = {k: v.clone() for k, v in tr.state.network.state_dict().items()}
        rng = torch.get_rng_state()
        result, opt = probe.run_probe(tr.state, tr.cfg, tr.events, tr.build_optimizer, tr.train_step)
        group = opt.param_groups[0]
        assert group["name"] == "unet"
        assert result.lr == group["d"] * group["lr"]  # read from the optimizer's own state
        assert result.steps == group["k"] == len(result.curves["unet"]) == 5
        assert not result.settled and result.budget == 5
        assert result.lr > result.curves["unet"][0]  # d grew from its d0
        # The probe did move the weights (its optimizer holds non-zero state) ...
        assert any(s["exp_avg"].abs().sum() > 0 for s in opt.state.values())
        # ... and they are back to their initial values, bit for bit, with the RNG.
        after = tr.state.network.state_dict()
        assert all(torch.equal(initial[k], after[k]) for k in initial)
        assert torch.equal(rng, torch.get_rng_state())
        assert all(p.grad is None for p in tr.state.network.parameters())
        png = (tmp_path / "reset" / probe.PLOT_NAME).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        curve = json.loads((tmp_path / "reset" / probe.CURVE_NAME).read_text())
        assert curve["curves"]["unet"][-1] == result.lr
        # The text encoder steps at half the U-Net's d x lr (DAdaptAdam's layer_scale).
        assert result.curves["textencoder"][-1] == pytest.approx(result.lr * 0.5)
    finally:
        tr.close()


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_auto_run_equals_a_manual_run_at_the_found_value(dataset, tmp_path, tiny_backbone, capsys):
    from lib_lora.cli import main

    run_dir = tmp_path / "auto"
    argv = ["train", str(dataset), "--name", "auto", "--output-dir", str(tmp_path / "out"), "--run-dir", str(run_dir)]
    for k, v in dataclasses.asdict(_cfg(dataset, tmp_path, "auto")).items():
        if k not in ("name", "dataset", "output_dir", "run_dir") and v != getattr(TrainConfig(), k):
            argv += ["--" + k.replace("_", "-"), str(v)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    events = [json.loads(line) for line in (run_dir / "logs" / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    done = [e for e in events if e["kind"] == "probe_done"]
    assert len(done) == 1
    found = done[0]["lr"]
    probes = [e for e in events if e["kind"] == "probe"]
    assert [e["step"] for e in probes] == list(range(1, done[0]["steps"] + 1))
    assert probes[-1]["dlr"] == found
    plot = run_dir / probe.PLOT_NAME
    assert done[0]["plot"] == str(plot) and plot.is_file()
    # The CLI tells the user the value and where to look.
    assert f"Learning rate found: {found:.3g}" in err and str(plot) in err

    auto_path = tmp_path / "out" / "auto.safetensors"
    a, md = read_lora(auto_path)
    assert float(md["ss_unet_lr"]) == found == float(md["ss_learning_rate"])
    assert float(md["ss_text_encoder_lr"]) == pytest.approx(found * 0.1)
    info = json.loads(md[probe.METADATA_KEY])
    assert info["lr"] == found and info["steps"] == done[0]["steps"] and info["optimizer"] == "dadaptation"
    assert "AdamW" in md["ss_optimizer"]

    manual = train(_cfg(dataset, tmp_path, "manual", lr=repr(found)), backbone=tiny_backbone)
    m, _ = read_lora(manual.lora_path)
    assert a.keys() == m.keys()
    assert all(torch.equal(a[k], m[k]) for k in a)  # nothing of the probe leaks into training
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_up.weight"))  # and it did train

    probe_tb = _scalars(run_dir / "logs" / "probe")
    for tag in ("lr/d*lr/unet", "lr/d*lr/textencoder", "lr/unet", "lr/textencoder", "loss/current", "loss/average"):
        assert tag in probe_tb, tag
    assert probe_tb["lr/d*lr/unet"][-1] == pytest.approx(found, rel=1e-6)  # stored as float32
    train_tb = _scalars(run_dir / "logs")
    assert train_tb["lr/unet"][-1] == pytest.approx(found, rel=1e-6)
    assert "loss/current" in train_tb and all(math.isfinite(v) for v in train_tb["loss/current"])


def test_prodigy_adapts_all_the_way_without_a_probe(dataset, tmp_path, tiny_backbone):
    events = []
    cfg = _cfg(dataset, tmp_path, "prodigy", optimizer="prodigy", max_steps=2)
    res = train(cfg, backbone=tiny_backbone, on_event=events.append)
    assert not [e for e in events if e["kind"] in ("probe", "probe_done")]
    assert not (res.run_dir / probe.PLOT_NAME).exists()
    md = res.metadata
    assert "Prodigy" in md["ss_optimizer"] and probe.METADATA_KEY not in md
    assert float(md["ss_unet_lr"]) == 1.0 == float(md["ss_text_encoder_lr"])


def test_a_probe_that_finds_nothing_says_so(dataset, tmp_path, tiny_backbone):
    from lib_lora.errors import UserError

    # One step: D-Adaptation cannot have raised d from d0 yet.
    cfg = _cfg(dataset, tmp_path, "short", probe_min_steps=1, probe_max_steps=1)
    with pytest.raises(UserError, match="did not move"):
        train(cfg, backbone=tiny_backbone)
    assert not (tmp_path / "out" / "short.safetensors").exists()


def test_probe_fields_are_in_the_config_schema():
    cfg = dataclasses.replace(TrainConfig(), probe_optimizer="prodigy")
    from lib_lora.config import validate

    assert validate(cfg).probe_optimizer == "prodigy"
    with pytest.raises(Exception, match="probe_optimizer"):
        validate(dataclasses.replace(cfg, probe_optimizer="adamw"))
