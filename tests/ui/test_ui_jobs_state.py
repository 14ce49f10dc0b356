"""State that survives a reload: jobs kept on the server and reattached, last used values
restored, Stop that ends visibly, stale output cleared, warnings shown, Apply preset refreshing
the view. Handler level (no browser); run under gradio 3.41 and gradio 4."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from lib_lora.errors import Cancelled
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.ui import app as app_mod
from lib_lora.ui import memory, tab_edit, tab_test, tab_train
from lib_lora.ui.app import build_tabs
from lib_lora.ui.jobs import JobRunner, stop_view


@pytest.fixture()
def host(tmp_path: Path) -> StandaloneHost:
    return StandaloneHost(output_dir=tmp_path / "loras", work_dir=tmp_path / "work", device="cpu")


def value_of(update):
    return update.get("value") if isinstance(update, dict) else getattr(update, "value", update)


def interactive_of(update):
    return update.get("interactive") if isinstance(update, dict) else getattr(update, "interactive", None)


def blocking_job(runner: JobRunner, tab: str, events: list[dict], log_warning: str | None = None):
    """A job on `tab` that sends `events`, logs a warning, then runs until stopped."""
    ready = threading.Event()

    def work(p):
        p.update(3, 10, "training")
        for ev in events:
            p.event(ev)
        if log_warning:
            logging.getLogger("lib_lora.training.data").warning(log_warning)
        ready.set()
        while not p.cancelled():
            threading.Event().wait(0.02)
        raise Cancelled()

    job = runner.start("Train", work, tab=tab)
    assert ready.wait(10)
    return job


# ---- last used values ------------------------------------------------------------------------

def test_last_used_values_come_back_after_a_reload(host: StandaloneHost) -> None:
    tabs = build_tabs(host)
    ctx = tabs.fast_lora
    train = ctx.parts["train"]
    comps = [train["name"], train["dataset"], train["controls"]["dim"], train["controls"]["optimizer"]]
    ctx.keep(comps, ["小明", "/data/xiaoming", 4, "adamw"])
    saved = json.loads((host.work_dir() / memory.FILE_NAME).read_text(encoding="utf-8"))
    assert saved["fast_lora_train_name"] == "小明" and saved["fast_lora_train_dim"] == 4

    # A new page (the same server) asks for them on load; the rest keep their defaults.
    restored = dict(zip(ctx.remembered, app_mod.restore_values(build_tabs(host).fast_lora), strict=True))
    assert value_of(restored["fast_lora_train_name"]) == "小明"
    assert value_of(restored["fast_lora_train_dataset"]) == "/data/xiaoming"
    assert value_of(restored["fast_lora_train_dim"]) == 4
    assert value_of(restored["fast_lora_train_optimizer"]) == "adamw"
    assert value_of(restored["fast_lora_prepare_src"]) is None  # never used: untouched


def test_a_remembered_value_that_no_longer_fits_is_left_out(host: StandaloneHost, tmp_path: Path) -> None:
    tabs = build_tabs(host)
    ctx = tabs.fast_lora
    optimizer = ctx.parts["train"]["controls"]["optimizer"]
    assert value_of(memory.restore_update(optimizer, "no-such-optimizer")) is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    assert memory.FormMemory(bad).load() == {}  # a broken file: defaults, never a traceback
    memory.FormMemory(bad).save({"k": 1, "image": object()})  # only plain values are kept
    assert json.loads(bad.read_text(encoding="utf-8")) == {"k": 1}


# ---- reattach, stop, warnings -----------------------------------------------------------------

def test_a_reloaded_page_reattaches_to_the_running_training(host: StandaloneHost) -> None:
    tabs = build_tabs(host)
    ctx = tabs.fast_lora
    events = [{"kind": "phase", "text": "Training 10 steps on cpu (fp32)"},
              {"kind": "loss", "step": 1, "loss": 0.5}, {"kind": "loss", "step": 2, "loss": 0.4},
              {"kind": "optimizer", "requested": "adamw8bit", "used": "torch.optim.adamw.AdamW",
               "note": "AdamW8bit cannot step on cpu (no CUDA); using torch AdamW (32-bit) instead."},
              {"kind": "phase", "level": "warning", "text": "the probe did not settle within its budget"}]
    job = blocking_job(ctx.runner, tab_train.TAB, events, log_warning="skipping broken.png: not an image")

    view = tab_train.reattach(ctx)  # what a page's load event streams
    first = next(view)
    assert len(first) == len(ctx.parts["train"]["outputs"])
    assert first[1] is None and first[3] == [] and first[4] == ""  # the last run's chart, samples, result cleared
    assert interactive_of(first[7]) is False  # Start is disabled while the run goes on
    status, loss_chart = None, None
    for out in view:
        status, loss_chart = out[0], out[1] if isinstance(out[1], Image.Image) else loss_chart
        if loss_chart is not None:
            break
    assert "3/10" in status and "smoothed loss 0.4500" in status  # the chart's line: mean of 0.5 and 0.4
    assert "optimizer: AdamW (AdamW8bit cannot step on cpu" in status
    assert "the probe did not settle" in status and "skipping broken.png" in status  # the warnings box

    stopping = list(stop_view(ctx.runner, tab_train.TAB, tab_train.STOPPED))
    assert "Stopped" in stopping[-1] and "fast-lora-msg-stopped" in stopping[-1]
    last = list(view)[-1]
    assert "Stopped" in last[0] and "ETA" not in last[0]  # the progress is gone, the stop is said
    assert interactive_of(last[7]) is True
    assert not job.running and ctx.runner.job_for(tab_train.TAB) is job


def test_stop_on_a_tab_stops_only_that_tabs_job(host: StandaloneHost) -> None:
    ctx = build_tabs(host).fast_lora
    assert "Nothing is running" in list(stop_view(ctx.runner, tab_test.TAB))[-1]
    job = blocking_job(ctx.runner, tab_train.TAB, [])
    assert "runs on its own tab" in list(stop_view(ctx.runner, tab_test.TAB))[-1]
    assert job.running
    assert "Stopped" in list(stop_view(ctx.runner, tab_train.TAB))[-1] and not job.running


def test_stop_after_the_job_reached_its_end_keeps_its_result(host: StandaloneHost) -> None:
    """A job that ends on its own while Stop waits (its last step, or the WebUI's preview that
    Stop only cuts) finished: the status must not say "Stopped" over its result."""
    ctx = build_tabs(host).fast_lora
    release = threading.Event()

    def work(progress):  # ignores the stop request, as a job past its last check does
        release.wait(10)
        return "saved"

    job = ctx.runner.start("Train", work, tab=tab_train.TAB)
    threading.Timer(0.3, release.set).start()
    last = list(stop_view(ctx.runner, tab_train.TAB, interval=0.05))[-1]
    assert not job.cancelled and not job.error
    assert "finished before it could stop" in last and "Stopped" not in last


def test_remembered_values_and_run_folders_stay_inside_the_policy(tmp_path: Path) -> None:
    """Beyond loopback the policy's roots are fixed at start; a work folder moved outside them
    later (a setting) must not receive the page's last values or a training's run folder."""
    from lib_lora import config
    from lib_lora.errors import UserError
    from lib_lora.ui import forms
    from lib_lora.ui.paths import FolderPolicy

    class MovedHost(StandaloneHost):
        def work_dir(self) -> Path:
            return tmp_path / "elsewhere"

    host = MovedHost(output_dir=tmp_path / "loras", work_dir=tmp_path / "work", device="cpu")
    ctx = build_tabs(host).fast_lora
    ctx.policy = FolderPolicy.limited([tmp_path / "work", tmp_path / "loras"])
    ctx.memory.save({"fast_lora_train_name": "sks"})
    assert not (tmp_path / "elsewhere").exists()
    data = tmp_path / "work" / "data"
    data.mkdir(parents=True)
    form = ctx.parts["train"]["form"]
    values = forms.values_of(config.TrainConfig(), form.names)
    with pytest.raises(UserError, match="outside the folders"):
        form.config(ctx, "sks", str(data), "manual", "1e-4", values)


def test_no_job_yet_changes_nothing_on_load(host: StandaloneHost) -> None:
    ctx = build_tabs(host).fast_lora
    for key in ("prepare", "tag", "train", "test"):
        out = list(ctx.parts[key]["reattach"]())
        assert len(out) == 1 and all(u == gr.update() for u in out[0]), key


def test_the_test_tabs_lora_list_is_read_again_on_load(host: StandaloneHost) -> None:
    ctx = build_tabs(host).fast_lora  # built with no LoRA yet
    host.lora_dir().mkdir(parents=True, exist_ok=True)
    for name in ("alpha", "beta"):
        (host.lora_dir() / f"{name}.safetensors").write_bytes(b"")
    ctx.memory.save({"fast_lora_test_lora": "alpha"})
    update = ctx.parts["test"]["remembered_lora"]()
    assert update["choices"] in (["alpha", "beta"], [("alpha", "alpha"), ("beta", "beta")]) or \
        list(update["choices"]) == ["alpha", "beta"]
    assert value_of(update) == "alpha"


def test_the_test_grid_stops_within_an_image(tmp_path: Path) -> None:
    """Stop is seen between denoising steps, not only between the grid's images."""
    host = StandaloneHost(base_model="tiny", output_dir=tmp_path / "l", work_dir=tmp_path / "w", device="cpu")

    class StopAfter:
        def __init__(self, n: int) -> None:
            self.asked = 0
            self.n = n

        def update(self, *a, **k) -> None:
            pass

        def cancelled(self) -> bool:
            self.asked += 1
            return self.asked > self.n

    progress = StopAfter(2)  # the check before the image, then one denoising step
    with pytest.raises(Cancelled):
        host.generate(["a photo"], 1, steps=6, width=64, height=64, progress=progress)
    assert progress.asked == 3


# ---- edit tags ----------------------------------------------------------------------------------

def test_apply_preset_shows_the_captions_it_wrote(host: StandaloneHost, tmp_path: Path) -> None:
    from lib_lora.ui.context import UIContext

    ctx = UIContext(host=host)
    folder = tmp_path / "ds" / "1_zny"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 40, 80, 120)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text("1girl, smile, blue eyes", encoding="utf-8")
    status, freqs, gallery, shown, _ = tab_edit.apply(ctx, str(folder), "", False, "person", "xiaoming")
    assert "Applied the person rules" in status
    on_disk = (folder / "000.txt").read_text(encoding="utf-8")
    assert on_disk.startswith("xiaoming")
    tags = {row[0]: row[1] for row in freqs}
    assert tags.get("xiaoming") == 3, freqs  # the table shows what the files now hold
    assert gallery[0][1].startswith("xiaoming")  # and so do the thumbnails' captions
    assert "undo: yes" in status
