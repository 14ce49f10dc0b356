"""The Prepare tab's crop editor in a real browser: a handle dragged resizes the box and writes
the fields; a typed coordinate moves the overlay and redraws the source."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# The browser flow's fixtures (Chromium, the standalone app on loopback, a page) and its Page helpers.
_spec = importlib.util.spec_from_file_location("fast_lora_browser_flow", Path(__file__).with_name("test_ui_browser_flow.py"))
_flow = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_flow)
browser, app, page, Page = _flow.browser, _flow.app, _flow.page, _flow.Page


def _box(page) -> list[float]:
    return [float(page.locator(f"#fast_lora_prepare_{k} input").first.input_value()) for k in ("x0", "y0", "x1", "y1")]


def _overlay(page) -> dict:
    return page.locator(".fast-lora-crop-box").first.evaluate(
        "(el) => ({left: el.offsetLeft, top: el.offsetTop, width: el.offsetWidth, display: el.style.display})")


def test_crop_box_resizes_by_its_handles_and_follows_typed_numbers(app, page, photos, artifacts):
    url = app[0]
    ui = Page(page, artifacts)
    page.goto(url)
    page.wait_for_selector("#fast_lora_tabs", timeout=60_000)
    ui.fill("fast_lora_prepare_src", str(photos))
    ui.fill("fast_lora_prepare_name", "astro")
    ui.fill("fast_lora_prepare_size", "128")
    ui.click("fast_lora_prepare_run")
    ui.wait_text("fast_lora_prepare_status", "done", 180)
    page.locator("#fast_lora_prepare_gallery img").first.click()  # the astronaut, 512 x 512
    ui.open_accordion("fast_lora_prepare_crop_panel")
    ui.wait_text("fast_lora_prepare_crop_info", "Source 512 × 512 px", 30)
    page.wait_for_selector(".fast-lora-crop-box", state="visible", timeout=60_000)
    # The handle is where it will stay only once the shown image has loaded and the overlay has
    # been placed for it (a loaded machine can take seconds for both).
    page.wait_for_function("() => { const i = document.querySelector('#fast_lora_prepare_source img');"
                           " return i && i.complete && i.naturalWidth > 0; }", timeout=60_000)
    page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
    before = _box(page)
    assert before[2] > before[0] and before[3] > before[1], before

    # Drag the bottom-right handle 30 px left and 20 px up (screen pixels).
    handle = page.locator(".fast-lora-crop-se").first
    hb = handle.bounding_box()
    img = page.locator("#fast_lora_prepare_source img").first.evaluate(
        "(el) => el.getBoundingClientRect().width / el.naturalWidth")  # screen px per shown px (shown = source here)
    x, y = hb["x"] + hb["width"] / 2, hb["y"] + hb["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x - 15, y - 10, steps=3)
    page.mouse.move(x - 30, y - 20, steps=3)
    page.mouse.up()
    page.wait_for_function("(v) => document.querySelector('#fast_lora_prepare_x1 input').value !== v",
                           arg=str(int(before[2])), timeout=60_000)
    after = _box(page)
    assert after[0] == before[0] and after[1] == before[1], (before, after)  # the other corner stays
    assert after[2] == pytest.approx(before[2] - 30 / img, abs=2) and after[3] == pytest.approx(before[3] - 20 / img, abs=2)
    ui.shot("crop_resized")

    # A typed Left moves the overlay at once and the server redraws the source.
    left_before = _overlay(page)["left"]
    src_before = page.locator("#fast_lora_prepare_source img").first.get_attribute("src")
    ui.fill("fast_lora_prepare_x0", str(int(after[0]) + 40))
    page.wait_for_function("(l) => document.querySelector('.fast-lora-crop-box').offsetLeft > l + 10",
                           arg=left_before, timeout=60_000)
    page.wait_for_function("(s) => document.querySelector('#fast_lora_prepare_source img').getAttribute('src') !== s",
                           arg=src_before, timeout=120_000)  # a busy machine queues the redraws
