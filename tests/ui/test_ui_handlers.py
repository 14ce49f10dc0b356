"""The tabs' handlers without a browser: step count, validation messages, undo, jobs, folders.

These run under both gradio 3.41 (main env) and gradio 4 (.venv-gradio4, see the Makefile)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import gradio as gr
import pytest
from helpers_ui import form_values, train_form
from PIL import Image

from lib_lora import config
from lib_lora.errors import Cancelled, UserError
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.ui import forms, steps, tab_edit, tab_prepare, tab_test, tab_train
from lib_lora.ui.app import ROOT, build_app, build_tabs
from lib_lora.ui.context import UIContext
from lib_lora.ui.i18n import ui_strings
from lib_lora.ui.jobs import JobRunner
from lib_lora.ui.paths import FolderPolicy


@pytest.fixture()
def ctx(tmp_path: Path) -> UIContext:
    host = StandaloneHost(output_dir=tmp_path / "loras", work_dir=tmp_path / "work", device="cpu")
    return UIContext(host=host)


def make_dataset(root: Path, n: int, repeats: int, name: str = "zny") -> Path:
    sub = root / f"{repeats}_{name}"
    sub.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (i * 7 % 255, 80, 120)).save(sub / f"{i:03d}.png")
        (sub / f"{i:03d}.txt").write_text(f"{name}, 1girl, smile", encoding="utf-8")
    return root


# ---- the whole page builds ------------------------------------------------------------------

def test_build_app_and_tabs(ctx: UIContext) -> None:
    app = build_app(ctx.host)
    tabs = build_tabs(ctx.host)
    assert len(app.fns) > 30 and len(tabs.fns) > 30
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    for needed in ("fast_lora_prepare_run", "fast_lora_tag_run", "fast_lora_edit_preview", "fast_lora_train_start",
                   "fast_lora_train_stop", "fast_lora_test_run", "fast_lora_lang"):
        assert needed in ids


def test_every_label_has_a_chinese_translation(ctx: UIContext) -> None:
    zh = json.loads((ROOT / "localizations" / "zh_CN.json").read_text(encoding="utf-8"))
    labels = ui_strings(build_app(ctx.host), with_choices=False)
    # Advanced options come from the config schema, which other steps extend; a new one shows in
    # English until translated, so they are reported here but only the rest must be complete.
    generated = {forms.label_for(f) for cls in (config.TrainConfig, steps.prepare_config(), steps.tag_config())
                 if not isinstance(cls, steps.Missing) for f in forms.fields(cls, "advanced")}
    untranslated = sorted(s for s in labels if s not in zh and s not in generated)
    assert not untranslated, untranslated
    for word in (*tab_edit.SCOPES, "auto", "manual", *config.PRESETS):
        assert word in zh


# ---- train: step count and validation ---------------------------------------------------------

def test_step_count_is_the_tutorials_arithmetic(ctx: UIContext, tmp_path: Path) -> None:
    form = train_form()
    ds = make_dataset(tmp_path / "ds", n=35, repeats=30)
    text = tab_train.step_count(ctx, form, str(ds), form_values(form, resolution=64))
    assert text.startswith("**1050 steps** = 35 images × 30 repeats × 1 epoch ÷ batch 1"), text
    text = tab_train.step_count(ctx, form, str(ds), form_values(form, resolution=64, epochs=2, batch_size=4))
    assert text.startswith("**526 steps**") and "263 per epoch" in text, text  # ceil(1050 / 4) x 2
    assert "Choose a dataset" in tab_train.step_count(ctx, form, "", form_values(form))
    assert "does not exist" in tab_train.step_count(ctx, form, str(tmp_path / "nope"), form_values(form))


@pytest.fixture()
def headers_read(path_calls) -> list[str]:
    """The names of the images whose header the training scan reads, in order (the real reader
    runs; the scan decodes no pixels)."""
    from lib_lora.training import data

    return path_calls(data, "inspect")


def test_step_count_reads_each_image_once_per_file_version(ctx: UIContext, tmp_path: Path, headers_read) -> None:
    """Changing a number re-plans from what was read; only new or changed files are read again."""
    from lib_lora.training import data

    form = train_form()
    ds = make_dataset(tmp_path / "ds", n=5, repeats=3)
    sub = ds / "3_zny"
    (sub / "broken.png").write_bytes(b"not an image")

    def shown(**changes) -> tuple[str, list[str]]:
        """(the step count's text, the images whose header it read)."""
        before = len(headers_read)
        text = tab_train.step_count(ctx, form, str(ds), form_values(form, **{"resolution": 64, **changes}))
        return text, headers_read[before:]

    text, read = shown()
    assert text.startswith("**15 steps**") and "1 file(s) skipped" in text, text
    assert sorted(read) == ["000.png", "001.png", "002.png", "003.png", "004.png", "broken.png"]
    for changes, steps_text in (({"epochs": 3, "batch_size": 2}, "**24 steps**"),  # ceil(15 / 2) x 3
                                ({"max_steps": 7}, "**7 steps**"),
                                ({"resolution": 128, "enable_buckets": False}, "**15 steps**")):
        text, read = shown(**changes)
        assert text.startswith(steps_text) and read == [], (changes, text, read)
        # What it shows is what a scan that remembers nothing finds.
        cfg = form.config(ctx, "x", str(ds), "auto", "", form_values(form, **{"resolution": 64, **changes}))
        assert text.startswith(tab_train.describe_plan(data.plan_steps(ds, cfg), cfg.max_steps) + "  \n")

    (sub / "001.png").write_bytes(b"broken now")  # changed
    Image.new("RGB", (64, 64), "blue").save(sub / "new.png")  # added
    (sub / "002.png").unlink()  # removed
    text, read = shown()
    assert sorted(read) == ["001.png", "new.png"]
    assert text.startswith("**12 steps**") and "2 file(s) skipped" in text, text


def test_train_validation_messages(ctx: UIContext, tmp_path: Path) -> None:
    form = train_form()
    ds = make_dataset(tmp_path / "ds", n=2, repeats=3)
    ok = form.config(ctx, "张娜英", str(ds), "auto", "", form_values(form))
    assert ok.name == "张娜英" and ok.lr == "auto" and ok.output_dir == str(ctx.host.lora_dir())
    assert ok.run_dir == str(ctx.host.work_dir() / "runs" / "张娜英")
    cases = [
        (("../escape", str(ds), "auto", "", form_values(form)), "LoRA name"),
        (("", str(ds), "auto", "", form_values(form)), "is empty"),
        (("a", str(ds), "manual", "", form_values(form)), "Learning rate is empty"),
        (("a", str(ds), "manual", "fast", form_values(form)), "give a number such as 1e-4"),
        (("a", str(ds), "auto", "", form_values(form, batch_size=0)), "below its minimum 1"),
        (("a", str(ds), "auto", "", form_values(form, epochs=1.5)), "not a whole number"),
        (("a", str(tmp_path / "missing"), "auto", "", form_values(form)), "does not exist"),
    ]
    for args, message in cases:
        with pytest.raises(UserError, match=message):
            form.config(ctx, *args)


def test_run_train_shows_validation_error_without_starting(ctx: UIContext, tmp_path: Path) -> None:
    form = train_form()
    out = list(tab_train.run_train(ctx, form, "a/b", str(tmp_path), "auto", "", *form_values(form)))
    assert len(out) == 1 and "fast-lora-msg-error" in out[0][0] and "could leave the output folder" in out[0][0]
    assert not ctx.runner.busy()


def test_preset_fills_the_recipe(ctx: UIContext) -> None:
    form = train_form()
    out = tab_train.preset_values(form, "person", *form_values(form))
    lr_mode, values = out[0], dict(zip(form.names, out[2:], strict=True))
    assert lr_mode == "auto"
    assert values["dim"] == 128 and values["alpha"] == 64.0 and values["repeats"] == 30
    assert values["optimizer"] == "adamw8bit"


def test_live_view_follows_training_events() -> None:
    live = tab_train.Live()
    live.feed([{"kind": "phase", "text": "caching latents"}, {"kind": "loss", "step": 1, "loss": 0.2, "lr": 1e-4},
               {"kind": "loss", "step": 2, "loss": 0.1, "lr": 1e-4}, {"kind": "probe", "step": 1, "dlr": 3e-5}])
    assert live.phase == "caching latents" and live.losses == [(1, 0.2), (2, 0.1)] and live.changed_probe
    assert live.probe_image() is not None
    live.feed([])
    assert not live.changed_loss and live.seen == 4


# ---- edit tags: undo/redo through the tagging core ---------------------------------------------

def test_edit_bulk_add_undo_redo(ctx: UIContext, tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "ds", n=3, repeats=1) / "1_zny"
    caption = folder / "000.txt"
    status, freqs, gallery, shown, _ = tab_edit.load(ctx, str(folder), "", False)
    assert len(shown) == 3 and ["smile", 3, ""] in freqs and len(gallery) == 3
    status, *_ = tab_edit.add_tags(ctx, str(folder), "", False, "hat, outdoors", "all images")
    assert "Added hat, outdoors to 3 images" in status
    assert "hat" in caption.read_text(encoding="utf-8")
    status, *_ = tab_edit.undo(ctx, str(folder), "", False)
    assert "Undid" in status and "hat" not in caption.read_text(encoding="utf-8")
    status, *_ = tab_edit.redo(ctx, str(folder), "", False)
    assert "Redid" in status and "hat" in caption.read_text(encoding="utf-8")
    status, *_ = tab_edit.remove_tags(ctx, str(folder), "smile", False, "hat", "filtered images")
    assert "from 3 images" in status and "hat" not in caption.read_text(encoding="utf-8")
    status, *_ = tab_edit.add_tags(ctx, str(folder), "", False, " , ", "all images")
    assert "Type the tags to add" in status
    _, freqs, *_ = tab_edit.load(ctx, str(folder), "", True)  # the Chinese column, when asked for
    assert ["smile", 3, "微笑"] in freqs


def test_chinese_switch_without_a_folder_changes_nothing(ctx: UIContext) -> None:
    out = tab_edit.toggle_zh(ctx, "", "", True)  # the standalone page sets it on open for Chinese users
    assert len(out) == 5 and all(u == gr.update() for u in out)
    status, *_ = tab_edit.load(ctx, "", "", True)  # pressing Load with no folder still says so
    assert "fast-lora-msg-error" in status and "is empty" in status


class _WebUILikeHost(StandaloneHost):
    """A host that trains the model it has loaded: no base-model choice on the page."""

    language = "zh"

    def __getattribute__(self, name):
        if name == "base_model":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_tabs_for_a_host_with_its_own_model(tmp_path: Path) -> None:
    host = _WebUILikeHost(output_dir=tmp_path / "l", work_dir=tmp_path / "w")
    tabs = build_tabs(host)
    ctx = tabs.fast_lora
    assert "base_model" not in ctx.parts["train"]["form"].names
    assert ctx.parts["edit"]["show_zh"].value is True  # Chinese UI: translations shown by default


class _OwnModelHost(_WebUILikeHost):
    """No base-model choice; its backbone() is the model it has loaded, named as the host names it."""

    def backbone(self, base_model=None):
        assert base_model is None
        from lib_lora.training.models import load_backbone

        bb = load_backbone("tiny", device="cpu")
        bb.model_name = "host_model.safetensors"
        return bb


def test_run_train_records_the_hosts_model_name(tmp_path: Path) -> None:
    ctx = UIContext(host=_OwnModelHost(output_dir=tmp_path / "l", work_dir=tmp_path / "w", device="cpu"))
    form = tab_train.TrainForm([n for n in train_form().names if n != "base_model"], has_base_model=False)
    ds = make_dataset(tmp_path / "ds", n=2, repeats=1)
    values = form_values(form, resolution=64, enable_buckets=False, max_steps=1, dim=4, alpha=2.0,
                         optimizer="adamw", mixed_precision="no", cache_latents_to_disk=False,
                         sample_images=0, save_precision="fp32")
    out = list(tab_train.run_train(ctx, form, "own", str(ds), "manual", "1e-3", *values))
    assert "fast-lora-msg-ok" in out[-1][0], out[-1][0]
    saved = json.loads((ctx.host.work_dir() / "runs" / "own" / "config.json").read_text(encoding="utf-8"))
    assert saved["base_model"] == "host_model.safetensors"


def test_step_count_is_what_training_does(tmp_path: Path) -> None:
    """The count the tab shows (from its remembered scan) is the number of steps the run makes:
    buckets, a broken file and a too-small image included."""
    ctx = UIContext(host=_OwnModelHost(output_dir=tmp_path / "l", work_dir=tmp_path / "w", device="cpu"))
    form = tab_train.TrainForm([n for n in train_form().names if n != "base_model"], has_base_model=False)
    sub = tmp_path / "ds" / "2_zny"
    sub.mkdir(parents=True)
    for name, size in (("a", (128, 128)), ("b", (128, 128)), ("wide", (256, 64)), ("small", (32, 32))):
        Image.new("RGB", size, (len(name) * 40, 90, 160)).save(sub / f"{name}.png")
    (sub / "broken.png").write_bytes(b"not an image")
    recipe = dict(resolution=128, dim=4, alpha=2.0, optimizer="adamw", mixed_precision="no", sample_images=0,
                  cache_latents_to_disk=False, save_precision="fp32")
    tab_train.step_count(ctx, form, str(sub.parent), form_values(form, **recipe))  # reads the files
    values = form_values(form, epochs=2, batch_size=2, **recipe)
    shown = tab_train.step_count(ctx, form, str(sub.parent), values)
    # Per epoch: the 128x128 bucket has 2 images x 2 repeats (2 batches), the 256x64 one 1 x 2 (1 batch).
    assert shown.startswith("**6 steps**") and "2 file(s) skipped" in shown, shown
    out = list(tab_train.run_train(ctx, form, "parity", str(sub.parent), "manual", "1e-3", *values))
    assert "fast-lora-msg-ok" in out[-1][0], out[-1][0]
    meta = dict(map(tuple, out[-1][5]))
    assert meta["ss_steps"] == meta["ss_max_train_steps"] == "6" and meta["ss_num_train_images"] == "6"


# ---- prepare, test, folders, jobs ------------------------------------------------------------

def test_prepare_reports_a_bad_source(ctx: UIContext, tmp_path: Path) -> None:
    cfg_cls = steps.prepare_config()
    names = [f.name for f in forms.fields(cfg_cls)]
    values = forms.values_of(cfg_cls(name="x"), names)
    out = list(tab_prepare.run_prepare(ctx, str(tmp_path / "nope"), names, *values))
    assert "does not exist" in out[0][0]


def test_test_tab_input_checks(ctx: UIContext) -> None:
    assert tab_test.parse_weights("0, 0.5;1") == [0.0, 0.5, 1.0]
    with pytest.raises(UserError, match="numbers separated by commas"):
        tab_test.parse_weights("zero")
    rows, cells = tab_test.grid_prompts("小明", "{name}, smile\n\nportrait", [0, 1])
    assert rows == ["小明, smile", "portrait"]
    assert cells[1] == "小明, smile <lora:小明:1>" and len(cells) == 4
    out = list(tab_test.run_test(ctx, "nope", "x", "1", "", 1, 4, 7, 64, 64))
    assert "No LoRA named 'nope'" in out[0][0]
    assert tab_test.sampler_names(ctx)[0] == "DPM++ 2M Karras"  # the standalone host's default
    (ctx.host.lora_dir()).mkdir(parents=True, exist_ok=True)
    (ctx.host.lora_dir() / "known.safetensors").write_bytes(b"")
    out = list(tab_test.run_test(ctx, "known", "x", "1", "", 1, 4, 7, 64, 64, "k_euler_zz"))
    assert "Unknown sampler 'k_euler_zz'" in out[0][0] and not ctx.runner.busy()


def test_folder_policy_limits_remote_pages(tmp_path: Path) -> None:
    allowed = tmp_path / "work"
    (allowed / "photos").mkdir(parents=True)
    policy = FolderPolicy.limited([allowed])
    assert policy.check(str(allowed / "photos")) == (allowed / "photos").resolve()
    assert policy.check("photos") == (allowed / "photos").resolve()  # relative: under the first root
    with pytest.raises(UserError, match="outside the folders this server may use"):
        policy.check("/etc")
    with pytest.raises(UserError, match="outside"):
        policy.check(str(allowed / ".." / ".."))
    assert FolderPolicy().check(str(tmp_path)) == tmp_path.resolve()


def test_job_runner_progress_eta_cancel() -> None:
    runner = JobRunner()
    started = threading.Event()

    def work(p):
        for i in range(1000):
            p.update(i, 1000, "working")
            started.set()
            if p.cancelled():
                raise Cancelled()
            time.sleep(0.005)

    job = runner.start("demo", work)
    assert started.wait(5)
    time.sleep(0.1)
    assert job.progress.eta_seconds() is not None and job.progress.eta_seconds() > 0
    with pytest.raises(UserError, match="still running"):
        runner.start("another", lambda p: None)
    assert runner.stop()
    states = list(runner.follow(job, interval=0.05))
    assert states[-1].cancelled and not job.running
    job = runner.start("fails", lambda p: (_ for _ in ()).throw(UserError("Say what to do.")))
    list(runner.follow(job, interval=0.05))
    assert job.error == "Say what to do."


def test_a_missing_step_says_so(ctx: UIContext, tmp_path: Path, monkeypatch) -> None:
    """A build without a step's module: its tab says what is missing instead of failing."""
    monkeypatch.setattr(steps, "prepare", lambda: steps.Missing("Prepare", "lib_lora.dataset.prepare", "test"))
    out = list(tab_prepare.run_prepare(ctx, str(tmp_path), []))
    assert "not available in this build" in out[0][0]
