"""The whole workflow in a real browser (Playwright + Debian's Chromium) against the standalone
app on loopback, on the tiny model: prepare → tag → person preset diff, applied, refreshes the
table → train with auto lr, stopped once, started again, the page reloaded mid-run reattaches
(fields, progress, warnings, result) → the LoRA file has metadata → a test grid stopped, then
one made → the language switch keeps the tab and the fields. Screenshots of every tab go to
test-artifacts/ui/ (the README's docs/screenshots/ are copies of them)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from lib_lora.ui import steps

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
NEEDED = [steps.prepare(), steps.captions(), steps.taggers(), steps.session(), steps.rules(), steps.training_run(),
          steps.training_data()]
MISSING = [m.message() for m in NEEDED if isinstance(m, steps.Missing)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (make test installs it: apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def app(tmp_path):
    from lib_lora.hosts.standalone import StandaloneHost
    from lib_lora.ui import compat
    from lib_lora.ui.app import build_app

    host = StandaloneHost(base_model="tiny", output_dir=tmp_path / "loras", work_dir=tmp_path / "work", device="cpu")
    blocks = build_app(host)
    compat.enable_queue(blocks)
    port = free_port()
    compat.launch(blocks, "127.0.0.1", port, allowed_paths=[str(tmp_path)])
    ctx = blocks.fast_lora
    yield f"http://127.0.0.1:{port}/", host, ctx
    ctx.runner.stop()
    if ctx.runner.current is not None:
        ctx.runner.current.finished.wait(60)
    # The server's graceful shutdown can wait on open event streams; never let it hang the run.
    closer = threading.Thread(target=blocks.close, daemon=True)
    closer.start()
    closer.join(20)


@pytest.fixture()
def page(browser, app):
    """A fresh page, closed before the app so the server's shutdown need not wait for its socket."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(90_000)  # a shared, loaded CPU can starve the page for tens of seconds
    yield page
    page.close()


class Page:
    """Small helpers over a Playwright page for gradio's DOM (the same in gradio 3 and 4)."""

    def __init__(self, page, shots: Path) -> None:
        self.page, self.shots = page, shots
        self.t0 = time.monotonic()

    def tab(self, title: str) -> None:
        self.page.locator("#fast_lora_tabs .tab-nav button", has_text=title).first.click()
        self.page.wait_for_timeout(300)

    def fill(self, elem_id: str, value: str) -> None:
        box = self.page.locator(f"#{elem_id} textarea, #{elem_id} input").first
        box.fill(str(value))
        box.press("Tab")  # gradio 3 commits a Number on blur

    def value(self, elem_id: str) -> str:
        return self.page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()

    def click(self, elem_id: str) -> None:
        self.page.locator(f"#{elem_id}").first.click()

    def open_accordion(self, elem_id: str) -> None:
        self.page.locator(f"#{elem_id} > .label-wrap, #{elem_id} button.label-wrap").first.click()
        self.page.wait_for_timeout(200)

    def radio(self, elem_id: str, label: str) -> None:
        self.page.locator(f"#{elem_id} label", has_text=label).first.click()

    def wait_text(self, elem_id: str, text: str, timeout_s: float = 120) -> str:
        loc = self.page.locator(f"#{elem_id}").first
        deadline = time.monotonic() + timeout_s
        content = ""
        while time.monotonic() < deadline:
            try:
                content = loc.inner_text(timeout=15_000)
            except Exception as err:  # noqa: BLE001 - re-rendered under a busy CPU: look again
                if type(err).__name__ != "TimeoutError":
                    raise
                continue
            if text in content:
                return content
            self.page.wait_for_timeout(250)
        self.shot(f"failed_{elem_id}")
        raise AssertionError(f"#{elem_id} never showed {text!r}; it shows: {content[:500]!r}")

    def disabled(self, elem_id: str) -> bool:
        return self.page.locator(f"#{elem_id}").first.is_disabled()

    def wait_enabled(self, elem_id: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.disabled(elem_id):
            assert time.monotonic() < deadline, f"#{elem_id} stays disabled"
            self.page.wait_for_timeout(250)

    def load(self, url: str) -> None:
        self.page.goto(url)
        self.page.wait_for_selector("#fast_lora_tabs", timeout=60_000)

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True, timeout=90_000)
        print(f"[{time.monotonic() - self.t0:6.1f}s] {name}", flush=True)  # where the time goes (-s)


def test_whole_flow_in_browser(app, page, photos, tagger_files, bg_model, artifacts):
    from lib_lora.training.export import read_lora

    assert not MISSING, MISSING  # every step is in this build: a broken import fails here, not skips

    url, host, ctx = app
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    ui = Page(page, artifacts)
    ui.load(url)

    # Steps 1-2: prepare (face crop, optional cut-out) into the host's work folder.
    ui.fill("fast_lora_prepare_src", str(photos))
    ui.fill("fast_lora_prepare_name", "xiaoming")
    ui.fill("fast_lora_prepare_size", "128")
    ui.fill("fast_lora_prepare_repeats", "5")
    if bg_model is not None:
        ui.fill("fast_lora_prepare_remove_bg", str(bg_model))
    ui.click("fast_lora_prepare_run")
    ui.wait_text("fast_lora_prepare_status", "done", 180)
    train_dir = host.work_dir() / "xiaoming"
    image_dir = train_dir / "5_xiaoming"
    outputs = sorted(image_dir.glob("*.png")) + sorted(image_dir.glob("*.jpg"))
    assert len(outputs) == 5, outputs
    assert page.locator("#fast_lora_prepare_gallery img").count() >= 5
    ui.wait_text("fast_lora_prepare_skipped", "broken.jpg")
    page.locator("#fast_lora_prepare_gallery img").first.click()  # shows the source with its crop box
    ui.open_accordion("fast_lora_prepare_crop_panel")
    page.wait_for_selector("#fast_lora_prepare_source img", timeout=20_000)
    ui.shot("1_prepare")

    # Step 3: tag with the tiny ONNX tagger; Prepare filled in the folder.
    ui.tab("3 Tag")
    assert ui.value("fast_lora_tag_folder") == str(image_dir)
    ui.open_accordion("fast_lora_tag_advanced")
    model, tags = tagger_files
    ui.fill("fast_lora_tag_model", str(model))
    ui.fill("fast_lora_tag_tags_file", str(tags))
    page.locator("#fast_lora_tag_allow_download input").uncheck()
    ui.click("fast_lora_tag_run")
    ui.wait_text("fast_lora_tag_table", outputs[0].name, 120)
    assert all(p.with_suffix(".txt").is_file() for p in outputs)
    ui.shot("3_tag")

    # Step 4: the person preset, previewed as a diff, then applied (undoable).
    ui.tab("4 Edit tags")
    assert ui.value("fast_lora_edit_folder") == str(image_dir)
    ui.click("fast_lora_edit_load")
    ui.wait_text("fast_lora_edit_status", "images shown")
    ui.fill("fast_lora_edit_trigger", "xiaoming")
    ui.click("fast_lora_edit_preview")
    diff = ui.wait_text("fast_lora_edit_diff", "Preset person")
    assert "captions change" in diff
    ui.shot("4_edit_preview")
    ui.click("fast_lora_edit_apply")
    ui.wait_text("fast_lora_edit_status", "Applied the person rules")
    first_caption = outputs[0].with_suffix(".txt").read_text(encoding="utf-8")
    assert first_caption.startswith("xiaoming"), first_caption
    # The table and the thumbnails show the captions the preset wrote (the trigger, 5 times).
    ui.wait_text("fast_lora_edit_freqs", "xiaoming", 10)
    assert "xiaoming" in page.locator("#fast_lora_edit_gallery").inner_text()

    # Steps 5-6: train 20 steps with lr auto on the tiny model.
    ui.tab("5-6 Train")
    assert ui.value("fast_lora_train_dataset") == str(train_dir)
    ui.radio("fast_lora_train_preset", "person")
    page.wait_for_timeout(500)
    ui.fill("fast_lora_train_name", "小明")
    ui.fill("fast_lora_train_max_steps", "20")
    ui.fill("fast_lora_train_resolution", "64")
    ui.fill("fast_lora_train_dim", "4")
    ui.fill("fast_lora_train_alpha", "2")
    ui.wait_text("fast_lora_train_steps", "20 steps (max steps; one epoch is 25 = 5 images × 5 repeats", 30)
    ui.radio("fast_lora_train_lr_mode", "auto")
    ui.open_accordion("fast_lora_train_advanced")
    ui.fill("fast_lora_train_log_every_n_steps", "2")  # a denser loss chart
    ui.fill("fast_lora_train_probe_min_steps", "10")  # a short lr probe: this checks the wiring, not the lr
    ui.fill("fast_lora_train_probe_window", "4")
    ui.open_accordion("fast_lora_train_advanced")  # closed again, for a readable screenshot
    ui.click("fast_lora_train_start")
    # The live progress with its ETA, beside Start (model loading is slow on a shared CPU).
    ui.wait_text("fast_lora_train_status", "ETA", 300)
    assert ui.disabled("fast_lora_train_start")  # no second Start while it runs

    # Stop ends visibly: the status says so, the progress goes, Start comes back.
    ui.click("fast_lora_train_stop")
    stopped = ui.wait_text("fast_lora_train_status", "Stopped", 180)
    assert "ETA" not in stopped
    ui.wait_enabled("fast_lora_train_start")

    # Started again (it resumes), then the page is reloaded mid-run: it reattaches to the job.
    ui.click("fast_lora_train_start")
    ui.wait_text("fast_lora_train_status", "ETA", 300)
    running_at_reload = ctx.runner.busy()
    ui.load(url)
    ui.tab("5-6 Train")
    assert ui.value("fast_lora_train_name") == "小明"  # the last used values came back
    assert ui.value("fast_lora_train_max_steps") == "20"
    if running_at_reload and ctx.runner.busy():
        ui.wait_text("fast_lora_train_status", "ETA", 120)
        assert ui.disabled("fast_lora_train_start")
    deadline = time.monotonic() + 600
    while "Saved" not in ui.value("fast_lora_train_result"):
        assert time.monotonic() < deadline, page.locator("#fast_lora_train_status").first.inner_text()
        page.wait_for_timeout(500)
    status = page.locator("#fast_lora_train_status").first.inner_text()
    # What ran on this CPU, and the warning the CLI prints about it.
    assert "optimizer: AdamW (AdamW8bit cannot step on cpu" in status, status
    assert "Warnings" in status and "AdamW8bit cannot step on cpu" in status
    page.wait_for_selector("#fast_lora_train_loss img", timeout=20_000)
    page.wait_for_selector("#fast_lora_train_probe img", timeout=20_000)  # the lr probe's plot
    page.wait_for_selector("#fast_lora_train_samples img", timeout=20_000)  # samples, on by default in the tab
    assert not ui.disabled("fast_lora_train_start")
    ui.shot("5_train")
    lora = host.lora_dir() / "小明.safetensors"
    tensors, meta = read_lora(lora)
    assert meta["ss_output_name"] == "小明" and meta["ss_network_dim"] == "4"
    assert int(meta["ss_steps"]) == 20
    assert float(meta["ss_unet_lr"]) > 0  # found by the probe (lr auto)
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te_") for k in tensors)

    # Step 7: the weight x prompt grid through the standalone host's diffusers pipeline.
    ui.tab("7 Test")
    page.wait_for_timeout(500)
    assert "小明" in page.locator("#fast_lora_test_lora").inner_text() or ui.value("fast_lora_test_lora") == "小明"
    ui.fill("fast_lora_test_prompts", "{name}, portrait")
    ui.fill("fast_lora_test_weights", "0, 0.5, 0.75, 1")
    ui.fill("fast_lora_test_steps", "150")  # long enough to be stopped mid-grid
    ui.fill("fast_lora_test_width", "64")
    ui.fill("fast_lora_test_height", "64")
    ui.click("fast_lora_test_run")
    ui.wait_text("fast_lora_test_status", "generating", 120)
    ui.click("fast_lora_test_stop")
    stopped = ui.wait_text("fast_lora_test_status", "Stopped", 60)
    assert "ETA" not in stopped
    ui.wait_enabled("fast_lora_test_run")
    ui.fill("fast_lora_test_weights", "0, 1")
    ui.fill("fast_lora_test_steps", "4")
    ui.click("fast_lora_test_run")
    ui.wait_text("fast_lora_test_status", "1 prompts × 2 weights", 300)
    page.wait_for_selector("#fast_lora_test_grid img", timeout=30_000)
    ui.shot("7_test")

    # The language switch reloads the page in Chinese on the same tab, with the fields kept.
    ui.fill("fast_lora_test_negative", "blurry, lowres, 模糊")  # typed, not yet used
    page.locator("#fast_lora_lang label", has_text="中文").first.click()
    page.wait_for_timeout(1500)  # the switch reloads the page
    page.wait_for_selector("#fast_lora_tabs", timeout=60_000)
    page.wait_for_function("document.documentElement.lang === 'zh-CN'", timeout=30_000)
    deadline = time.monotonic() + 20
    while ui.value("fast_lora_test_negative") != "blurry, lowres, 模糊":
        assert time.monotonic() < deadline, ui.value("fast_lora_test_negative")
        page.wait_for_timeout(250)
    assert page.locator("#fast_lora_test_run").first.is_visible()  # the Test tab is open again
    assert ui.value("fast_lora_test_prompts") == "{name}, portrait"
    assert not errors, errors
