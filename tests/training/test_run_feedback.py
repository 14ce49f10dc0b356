"""What a run says while it runs: one phase label at a time, a loss chart with points in a
short run, a measured step time for the next plan, and one CLI bar with an honest rate."""

import io
import json

import pytest

from lib_lora.config import TrainConfig
from lib_lora.progress import NullProgress, TqdmProgress
from lib_lora.training import timing
from lib_lora.training.run import chart_every, train


class Recorder(NullProgress):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int, str]] = []

    def update(self, done: int, total: int, text: str = "") -> None:
        self.calls.append((done, total, text))


def _cfg(tmp_path, dataset, **kw) -> TrainConfig:
    base = dict(
        name="feedback", dataset=str(dataset), output_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"),
        resolution=64, dim=4, alpha=4.0, lr="1e-3", optimizer="adamw", lr_scheduler="constant",
        device="cpu", log_every_n_steps=10, max_steps=6, cache_latents_to_disk=False,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_each_update_names_the_current_phase(tmp_path, drawn_dataset, tiny_backbone):
    rec, events = Recorder(), []
    cfg = _cfg(tmp_path, drawn_dataset, sample_images=1, sample_steps=2, save_every_n_steps=3,
               lr="auto", probe_min_steps=4, probe_max_steps=4, probe_window=3)
    train(cfg, backbone=tiny_backbone, progress=rec, on_event=events.append)
    texts = [t for _, _, t in rec.calls]
    assert all(texts), "an update without a label leaves the previous phase's on the page"
    first_training = texts.index("training")
    # Latents and the probe come before the training, and never show again during it.
    assert "caching latents" in texts[:first_training] and "LR probe" in texts[:first_training]
    after = set(texts[first_training:])
    assert after <= {"training", "making samples", "saving a checkpoint", "writing the LoRA"}, after
    # A pause for samples or a checkpoint ends with the training label again, at the same step.
    pauses = [i for i, (_, _, text) in enumerate(rec.calls) if text in ("making samples", "saving a checkpoint")]
    assert pauses
    for i in pauses:
        nxt = rec.calls[i + 1]
        assert nxt[2] in ("training", "writing the LoRA") and nxt[0] == rec.calls[i][0], rec.calls[i:i + 2]
    assert not any(any(ch.isdigit() for ch in t) for t in texts), "numbers belong in the events, not the label"


def test_short_run_loss_events_every_step_tensorboard_keeps_its_cadence(tmp_path, drawn_dataset, tiny_backbone):
    events = []
    train(_cfg(tmp_path, drawn_dataset), backbone=tiny_backbone, on_event=events.append)
    # 6 steps with "log every 10": the chart still gets a point per step.
    assert [e["step"] for e in events if e["kind"] == "loss"] == [1, 2, 3, 4, 5, 6]
    assert chart_every(1050, 10) == 10  # the tutorial's run keeps the TensorBoard cadence
    assert chart_every(120, 10) == 2 and chart_every(30, 10) == 1 and chart_every(6, 10) == 1
    assert chart_every(100_000, 10) == 10 and chart_every(1000, 1) == 1


def test_run_folder_keeps_the_measured_step_time_for_the_next_plan(tmp_path, drawn_dataset, tiny_backbone):
    cfg = _cfg(tmp_path, drawn_dataset, max_steps=8)
    events = []
    res = train(cfg, backbone=tiny_backbone, on_event=events.append)
    rec = json.loads((res.run_dir / timing.FILE).read_text(encoding="utf-8"))
    done = [e for e in events if e["kind"] == "done"][0]
    assert rec["seconds_per_step"] > 0 and rec["seconds_per_step"] == done["seconds_per_step"]
    assert rec["seconds_per_step"] < done["seconds"]  # one step, not the whole run
    assert rec["device"] == "cpu" and rec["resolution"] == 64 and rec["base_model"] == cfg.base_model
    est = timing.find([tmp_path / "elsewhere", res.run_dir], cfg)
    assert est is not None and est.run == res.run_dir.name and est.seconds_per_step == rec["seconds_per_step"]
    # Another resolution or batch size costs another time: no estimate from this run.
    import dataclasses

    assert timing.find([res.run_dir], dataclasses.replace(cfg, resolution=128)) is None
    assert timing.find([res.run_dir], dataclasses.replace(cfg, batch_size=2)) is None
    assert timing.find([res.run_dir], dataclasses.replace(cfg, base_model="other.safetensors")) is None
    assert timing.find([res.run_dir], dataclasses.replace(cfg, base_model="other.safetensors"), any_model=True)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_step_clock_leaves_pauses_out():
    clock = FakeClock()
    sc = timing.StepClock(0, clock)
    for step in range(1, 11):
        clock.t += 2.0
        if step == 5:
            sc.pause()
            clock.t += 60.0  # making samples
            sc.resume()
        sc.mark(step)
    assert sc.seconds_per_step() == pytest.approx(2.0)


def test_cli_bar_is_one_bar_with_the_rate_of_the_steps():
    clock, out = FakeClock(), io.StringIO()
    bar = TqdmProgress(desc="train", unit="step", file=out, clock=clock)
    bar.update(0, 40, "training")
    first = bar._bar
    for step in range(1, 21):
        clock.t += 0.5
        bar.update(step, 40, "training")
    bar.update(20, 40, "making samples")  # a pause: 300 s of sampling
    bar.write("Making 4 sample image(s) at step 20")
    clock.t += 300.0
    bar.update(20, 40, "training")
    for step in range(21, 41):
        clock.t += 0.5
        bar.update(step, 40, "training")
    assert bar._bar is first, "the bar was re-created"
    assert bar.rate() == pytest.approx(2.0)  # 2 steps/s, the sampling left out
    bar.close()
    # A resumed run starts its bar at the saved step: the rate counts the steps done now.
    bar = TqdmProgress(desc="train", unit="step", file=io.StringIO(), clock=clock)
    bar.update(21, 400, "training")
    clock.t += 1.0
    bar.update(23, 400, "training")
    assert bar.rate() == pytest.approx(2.0)
    bar.close()


def test_cli_bar_shows_a_per_item_text_after_the_count():
    out = io.StringIO()
    bar = TqdmProgress(desc="prepare", unit="img", file=out, clock=FakeClock())
    bar.update(0, 3, "")
    bar.update(1, 3, "astronaut.jpg")
    assert "astronaut.jpg" in out.getvalue() and "prepare" in out.getvalue()
    bar.close()


def test_cli_plan_counts_the_probe_and_gives_a_measured_time(tmp_path, drawn_dataset, capsys):
    from lib_lora.training.cli import print_plan
    from lib_lora.training.data import plan_steps

    cfg = _cfg(tmp_path, drawn_dataset, max_steps=40, lr="auto", probe_min_steps=30)
    print_plan(cfg, plan_steps(cfg.dataset, cfg))
    out = capsys.readouterr().out
    assert "40 steps" in out and "up to 30 steps" in out and "up to 70 in all" in out and "no estimate yet" in out
    timing.save(tmp_path / "run", timing.record(cfg, "cpu", 3.0))
    print_plan(cfg, plan_steps(cfg.dataset, cfg))
    assert "about 4 min (3.00 s/step measured by the run 'run' on cpu)" in capsys.readouterr().out  # 70 x 3 s
