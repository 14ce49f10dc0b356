"""Step 7: a grid of prompts (rows) × LoRA weights (columns) from one seed, through the host's
generator (the WebUI's own pipeline inside the WebUI; diffusers on the loaded base model standalone)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import gradio as gr
from PIL import Image, ImageDraw, ImageFont

from lib_lora.errors import UserError
from lib_lora.names import validate_name
from lib_lora.ui import compat, widgets
from lib_lora.ui.context import UIContext
from lib_lora.ui.jobs import job_updates, stop_handler

ID = "fast_lora_test_"
TAB = "test"  # the runner's key for this tab's jobs
# `{trigger}`, as in the Train tab's sample prompts; `{name}` (what older saved prompts used) is read the same.
DEFAULT_PROMPTS = "{trigger}, portrait, looking at viewer\n{trigger}, full body, outdoors"
DEFAULT_WEIGHTS = "0, 0.5, 0.75, 1"
PLACEHOLDERS = ("{trigger}", "{name}")


def lora_names(ctx: UIContext) -> list[str]:
    folder = ctx.host.lora_dir()
    return sorted(p.stem for p in folder.glob("*.safetensors") if not p.name.startswith("."))


def parse_weights(text: str) -> list[float]:
    try:
        weights = [float(w) for w in str(text).replace(";", ",").split(",") if w.strip()]
    except ValueError:
        raise UserError(f"Weights {text!r}: give numbers separated by commas, such as 0, 0.5, 0.75, 1.") from None
    if not all(math.isfinite(w) for w in weights):  # float() reads nan and inf; the grid would be black
        raise UserError(f"Weights {text!r}: NaN and infinity are not weights; give numbers such as 0, 0.5, 0.75, 1.")
    if not weights:
        raise UserError("Give at least one LoRA weight, such as 0, 0.5, 0.75, 1.")
    if len(weights) > 8:
        raise UserError("At most 8 weights at once; the grid would be too slow.")
    return weights


def grid_prompts(name: str, prompts_text: str, weights: list[float]) -> tuple[list[str], list[str]]:
    """(row prompts, one prompt per cell in row-major order with `<lora:name:w>` appended)."""
    rows = [p.strip() for p in str(prompts_text).splitlines() if p.strip()]
    for mark in PLACEHOLDERS:  # the trigger word is the LoRA's name (its card's activation text)
        rows = [r.replace(mark, name) for r in rows]
    if not rows:
        raise UserError("Write at least one prompt (one per line; {trigger} stands for the LoRA's trigger word).")
    if len(rows) > 8:
        raise UserError("At most 8 prompts at once.")
    cells = [f"{row} <lora:{name}:{w:g}>" for row in rows for w in weights]
    return rows, cells


# Fonts that can write Chinese prompts on the grid (Debian/Ubuntu, macOS, Windows); PIL's
# built-in font is Latin-1 only.
FONT_CANDIDATES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "/System/Library/Fonts/PingFang.ttc", "C:/Windows/Fonts/msyh.ttc",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
)


def label_font(size: int = 14) -> tuple[ImageFont.ImageFont, bool]:
    """(font, whether it can write beyond Latin-1)."""
    for path in FONT_CANDIDATES:
        try:
            return ImageFont.truetype(path, size), "dejavu" not in path.lower()
        except OSError:
            continue
    return ImageFont.load_default(), False


def make_grid(images: list[Image.Image], rows: list[str], weights: list[float]) -> Image.Image:
    """Images in a table with the weights on top and the prompts on the left."""
    w, h = images[0].size
    if max(w, h) < 256:  # tiny test images: enlarge (pixelated, honest) so the grid is readable
        f = -(-256 // max(w, h))
        images, (w, h) = [im.resize((w * f, h * f), Image.NEAREST) for im in images], (w * f, h * f)
    left, top = 180, 28
    grid = Image.new("RGB", (left + w * len(weights), top + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    font, wide = label_font()
    for j, wt in enumerate(weights):
        draw.text((left + j * w + 6, 8), f"weight {wt:g}", fill="black", font=font)
    for i, row in enumerate(rows):
        text = row if len(row) <= 60 else row[:57] + "..."
        if not wide:  # a Latin-1 font: show what it can, never fail on a Chinese name
            text = text.encode("latin-1", "replace").decode("latin-1")
        lines = [text[k:k + 20] for k in range(0, len(text), 20)]
        draw.multiline_text((6, top + i * h + 6), "\n".join(lines), fill="black", font=font)
        for j in range(len(weights)):
            grid.paste(images[i * len(weights) + j].convert("RGB").resize((w, h)), (left + j * w, top + i * h))
    return grid


def sampler_names(ctx: UIContext) -> list[str]:
    """The host's samplers, its default first (empty for a host that has no choice)."""
    get = getattr(ctx.host, "samplers", None)
    return list(get()) if get is not None else []


def run_test(ctx: UIContext, name: str, prompts_text: str, weights_text: str, negative: str, seed: float,
             sample_steps: float, cfg_scale: float, width: float, height: float, sampler: str | None = None,
             ) -> Iterator[tuple]:
    """Generator handler: (status html, grid image, Generate button)."""
    try:
        name = validate_name(name or "", "LoRA name")
        if name not in lora_names(ctx):
            raise UserError(f"No LoRA named {name!r} in {ctx.host.lora_dir()}; train it first or refresh the list.")
        weights = parse_weights(weights_text)
        rows, cells = grid_prompts(name, prompts_text, weights)
        kw = dict(negative_prompt=negative or "", steps=int(sample_steps), cfg_scale=float(cfg_scale),
                  width=int(width), height=int(height))
        if sampler:
            choices = sampler_names(ctx)
            if choices and sampler not in choices:
                raise UserError(f"Unknown sampler {sampler!r}; choose one of {', '.join(choices)}.")
            kw["sampler_name"] = sampler

        def work(p: Any) -> Image.Image:
            images = ctx.host.generate(cells, int(seed), progress=p, **kw)
            return make_grid(images, rows, weights)

        done_text = f"{len(rows)} prompts × {len(weights)} weights, seed {int(seed)}."
        job = ctx.runner.start("Test", work, tab=TAB, view={"cells": len(cells), "done_text": done_text})
    except UserError as err:
        yield widgets.message_html(str(err), "error"), gr.update(), gr.update(interactive=True)
        return
    yield from follow_test(job)


def follow_test(job: Any) -> Iterator[tuple]:
    """(status, grid, Generate button): the last grid is cleared when a new one starts."""
    cells, done_text = job.view.get("cells", 0), job.view.get("done_text", "Done.")
    busy = gr.update(interactive=False)
    yield widgets.progress_html(0, cells, "starting"), None, busy
    for j in job_updates(job):
        p = j.progress
        if j.running:
            yield (widgets.progress_html(p.done, p.total or cells, p.text or "generating", p.eta_seconds(),
                                         p.elapsed()) + widgets.warnings_html(p.warnings), gr.update(), busy)
    tail = widgets.warnings_html(job.progress.warnings)
    idle = gr.update(interactive=True)
    if job.error or job.cancelled:
        kind = "error" if job.error else "stopped"
        yield widgets.message_html(job.error or "Stopped.", kind) + tail, gr.update(), idle
        return
    yield widgets.message_html(done_text, "ok") + tail, job.result, idle


def reattach(ctx: UIContext) -> Iterator[tuple]:
    """On page load: the running or last grid of this tab."""
    job = ctx.runner.job_for(TAB)
    if job is None:
        yield gr.update(), gr.update(), gr.update()
        return
    yield from follow_test(job)


def build(ctx: UIContext) -> dict[str, Any]:
    gr.Markdown("Try the LoRA at several weights: weight 0 is the base model, 1 the full LoRA.")
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                names = lora_names(ctx)
                lora = gr.Dropdown(names, value=names[-1] if names else None, label="LoRA", allow_custom_value=True,
                                   elem_id=ID + "lora")
                refresh = gr.Button("Refresh", elem_id=ID + "refresh")
            prompts = gr.Textbox(DEFAULT_PROMPTS, lines=3, label="Prompts (one per line)",
                                 info="{trigger} stands for the LoRA's trigger word (its name)", elem_id=ID + "prompts")
            negative = gr.Textbox("lowres, blurry", label="Negative prompt", elem_id=ID + "negative")
            weights = gr.Textbox(DEFAULT_WEIGHTS, label="LoRA weights", elem_id=ID + "weights")
            with gr.Row():
                samplers = sampler_names(ctx)
                sampler = gr.Dropdown(samplers, value=samplers[0] if samplers else None, label="Sampler",
                                      elem_id=ID + "sampler")
                seed = gr.Number(1234, precision=0, label="Seed", elem_id=ID + "seed")
                sample_steps = gr.Number(20, precision=0, minimum=1, maximum=150, label="Sampling steps",
                                         elem_id=ID + "steps")
                cfg_scale = gr.Number(7.0, minimum=1, maximum=30, label="CFG scale", elem_id=ID + "cfg")
            with gr.Row():
                width = gr.Number(512, precision=0, minimum=64, maximum=2048, label="Width", elem_id=ID + "width")
                height = gr.Number(512, precision=0, minimum=64, maximum=2048, label="Height", elem_id=ID + "height")
            with gr.Row():
                run = gr.Button("Generate grid", variant="primary", elem_id=ID + "run")
                stop = gr.Button("Stop", variant="stop", elem_id=ID + "stop")
            status = gr.HTML(elem_id=ID + "status")
        with gr.Column(scale=3):
            grid = gr.Image(label="Grid", type="pil", interactive=False, elem_id=ID + "grid")

    def _run(*args: Any) -> Iterator[tuple]:
        yield from run_test(ctx, *args)

    def _refresh(current: str) -> Any:
        names = lora_names(ctx)
        return compat.update(choices=names, value=current if current in names else (names[-1] if names else None))

    run_inputs = [lora, prompts, weights, negative, seed, sample_steps, cfg_scale, width, height, sampler]
    ctx.remember(*run_inputs[1:])  # the LoRA list is re-read on load instead (a new one may be there)

    def _run_kept(*args: Any) -> Iterator[tuple]:
        ctx.keep(run_inputs, args)
        ctx.memory.save({ID + "lora": args[0]})
        yield from _run(*args)

    outputs = [status, grid, run]
    event = run.click(_run_kept, run_inputs, outputs, **compat.event_kwargs())
    stop.click(stop_handler(ctx.runner, TAB), None, [status], **compat.event_kwargs())
    refresh.click(_refresh, [lora], [lora])
    return dict(lora=lora, refresh=refresh, prompts=prompts, weights=weights, width=width, height=height, sampler=sampler,
                seed=seed, steps=sample_steps, run=run, stop=stop, status=status, grid=grid, event=event,
                refresh_fn=_refresh, outputs=outputs, reattach=functools.partial(reattach, ctx),
                remembered_lora=lambda: _refresh(ctx.memory.get(ID + "lora") or ""))
