"""Steps 1-2: a folder of photos in, cropped and cut-out training images out.

A gallery shows each result; selecting one shows its source with the crop box (orange) and
the face found (cyan); drag the box or its corners and edges (javascript/fast_lora.js), click
the source to centre it there, or type the numbers, then re-run that one image. Skipped files are listed with their reasons.
"""

from __future__ import annotations

import dataclasses
import functools
import html
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image, ImageOps

from lib_lora.errors import UserError
from lib_lora.ui import compat, forms, steps, widgets
from lib_lora.ui.context import UIContext
from lib_lora.ui.jobs import job_updates, stop_handler

ID = "fast_lora_prepare_"
TAB = "prepare"  # the runner's key for this tab's jobs


def _record(item: Any) -> dict[str, Any]:
    """An ImageRecord as plain data for the page's state."""
    if dataclasses.is_dataclass(item):
        data = dataclasses.asdict(item)
    else:
        data = dict(vars(item))
    for k in ("source", "output"):
        if data.get(k) is not None:
            data[k] = str(data[k])
    for k in ("crop_box", "face_box"):
        if data.get(k) is not None:
            data[k] = [float(v) for v in data[k]]
    return data


def _ok(rec: dict[str, Any]) -> bool:
    return bool(rec.get("output")) and Path(rec["output"]).is_file()


def report_state(report: Any) -> dict[str, Any]:
    return {
        "train_dir": str(report.train_dir),
        "image_dir": str(report.image_dir),
        "items": [_record(i) for i in report.items],
        "summary": forms.ui_text(report.summary()) if hasattr(report, "summary") else "",
    }


def gallery_items(state: dict[str, Any]) -> list[tuple[Image.Image, str]]:
    return [(widgets.thumbnail(r["output"]), Path(r["output"]).name) for r in state.get("items", []) if _ok(r)]


def skipped_rows(state: dict[str, Any]) -> list[list[str]]:
    """Skipped files and kept ones with a warning, each with its reason."""
    rows = [[Path(r["source"]).name, "skipped" if not _ok(r) else str(r.get("status")), forms.ui_text(r.get("message") or "")]
            for r in state.get("items", []) if not _ok(r) or r.get("status") not in (None, "", "ok")]
    return rows or [["", "", ""]]


def run_prepare(ctx: UIContext, src: str, names: list[str], *values: Any) -> Iterator[tuple]:
    """Generator handler: (progress html, gallery, skipped rows, state, summary, Prepare button)."""
    mod, cfg_cls = steps.prepare(), steps.prepare_config()
    idle = gr.update(interactive=True)
    for m in (mod, cfg_cls):
        if isinstance(m, steps.Missing):
            yield widgets.message_html(m.message(), "missing"), [], [["", "", ""]], {}, "", idle
            return
    try:
        src_dir = ctx.policy.check(src, "source folder")
        cfg = forms.collect(cfg_cls, names, list(values), policy=ctx.policy)
        if "out" in names or hasattr(cfg, "out"):
            out = ctx.policy.check(cfg.out or ctx.default_folder(), "work folder", must_exist=False)
            cfg = dataclasses.replace(cfg, out=str(out))
        job = ctx.runner.start("Prepare images", lambda p: mod.prepare_dataset(src_dir, cfg, progress=p), tab=TAB)
    except UserError as err:
        yield widgets.message_html(str(err), "error"), gr.update(), gr.update(), gr.update(), "", idle
        return
    yield from follow_prepare(job)


def follow_prepare(job: Any) -> Iterator[tuple]:
    """The page's view of a Prepare job. The last dataset's gallery goes as soon as a new one
    starts, so a failed run never shows the previous images as its own."""
    busy, idle = gr.update(interactive=False), gr.update(interactive=True)
    yield widgets.progress_html(0, 0, "starting"), [], [["", "", ""]], {}, "", busy
    for j in job_updates(job):
        p = j.progress
        if j.running:
            yield (widgets.progress_html(p.done, p.total, p.text, p.eta_seconds(), p.elapsed())
                   + widgets.warnings_html(p.warnings), gr.update(), gr.update(), gr.update(), "", busy)
    tail = widgets.warnings_html(job.progress.warnings)
    if job.error or job.cancelled:
        kind = "error" if job.error else "stopped"
        yield widgets.message_html(job.error or "Stopped.", kind) + tail, gr.update(), gr.update(), gr.update(), "", idle
        return
    state = report_state(job.result)
    n_ok = sum(_ok(r) for r in state["items"])
    done = widgets.progress_html(n_ok, len(state["items"]), f"done: {state['train_dir']}", None, job.progress.elapsed(),
                                 state="done")
    yield done + tail, gallery_items(state), skipped_rows(state), state, state["summary"], idle


def reattach(ctx: UIContext) -> Iterator[tuple]:
    """On page load: the running or last Prepare of this tab, with its gallery."""
    job = ctx.runner.job_for(TAB)
    if job is None:
        yield (gr.update(),) * 6
        return
    yield from follow_prepare(job)


CROP_HELP = ("Drag the box to move it, or its corners and edges to resize it; click elsewhere on the image to "
             "centre it there; or type the coordinates.")


def crop_info(size: tuple[int, int] | None) -> str:
    """The line above the crop fields; its data-w/data-h give the page's crop editor the source size."""
    if size is None:
        return '<div class="fast-lora-crop-info">Select an image in the gallery to adjust its crop.</div>'
    w, h = size
    return (f'<div class="fast-lora-crop-info" data-w="{w}" data-h="{h}"><span>Source {w} × {h} px.</span> '
            f"<span>{html.escape(CROP_HELP)}</span></div>")


def select_image(state: dict[str, Any], evt: gr.SelectData) -> tuple:
    """Gallery click -> (source with boxes, index, x0, y0, x1, y1, crop info)."""
    ok = [r for r in (state or {}).get("items", []) if _ok(r)]
    idx = compat.select_index(evt)
    if idx is None or not (0 <= int(idx) < len(ok)):
        return None, -1, 0, 0, 0, 0, crop_info(None)
    rec = ok[int(idx)]
    box = rec.get("crop_box") or [0, 0, 0, 0]
    source = _open_source(rec["source"])
    shown = widgets.draw_boxes(source, rec.get("crop_box"), rec.get("face_box"))
    return (shown, int(idx), *[round(v) for v in box], crop_info(source.size))


def _open_source(path: str) -> Image.Image:
    """The source as the prepare step sees it: EXIF orientation applied (crop boxes use it)."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im)


def _source_size(path: str) -> tuple[int, int]:
    return _open_source(path).size


def move_box(state: dict[str, Any], idx: int, x0: float, y0: float, x1: float, y1: float, evt: gr.SelectData) -> tuple:
    """Click on the source image: centre the crop box there, keeping its size, inside the image."""
    ok = [r for r in (state or {}).get("items", []) if _ok(r)]
    if idx is None or not (0 <= int(idx) < len(ok)):
        return gr.update(), x0, y0, x1, y1
    rec = ok[int(idx)]
    w, h = _source_size(rec["source"])
    scale = max(w, h) / min(512, max(w, h))  # the shown image is scaled to 512 on its long side
    cx, cy = (float(v) * scale for v in compat.select_index(evt))
    bw, bh = max(1.0, x1 - x0), max(1.0, y1 - y0)
    nx0 = min(max(0.0, cx - bw / 2), max(0.0, w - bw))
    ny0 = min(max(0.0, cy - bh / 2), max(0.0, h - bh))
    box = [round(nx0), round(ny0), round(nx0 + bw), round(ny0 + bh)]
    return preview_box(state, idx, *box), *box


def preview_box(state: dict[str, Any], idx: int, x0: float, y0: float, x1: float, y1: float) -> Any:
    ok = [r for r in (state or {}).get("items", []) if _ok(r)]
    if idx is None or not (0 <= int(idx) < len(ok)):
        return gr.update()
    rec = ok[int(idx)]
    return widgets.draw_boxes(_open_source(rec["source"]), (x0, y0, x1, y1), rec.get("face_box"))


def recrop(ctx: UIContext, state: dict[str, Any], idx: int, x0: float, y0: float, x1: float, y1: float) -> tuple:
    """Re-run one image with the edited crop box -> (message, gallery, state)."""
    mod = steps.prepare()
    if isinstance(mod, steps.Missing):
        return widgets.message_html(mod.message(), "missing"), gr.update(), state
    ok = [r for r in (state or {}).get("items", []) if _ok(r)]
    if idx is None or not (0 <= int(idx) < len(ok)):
        return widgets.message_html("Select an image in the gallery first.", "error"), gr.update(), state
    box = tuple(int(round(float(v))) for v in (x0, y0, x1, y1))
    if box[2] <= box[0] or box[3] <= box[1]:
        return widgets.message_html("The crop box is empty: right must exceed left and bottom exceed top.", "error"), \
            gr.update(), state
    rec = ok[int(idx)]
    try:
        new = _record(mod.reprocess_image(Path(state["train_dir"]), Path(rec["source"]), box))
    except UserError as err:
        return widgets.message_html(str(err), "error"), gr.update(), state
    items = [new if r is rec else r for r in state["items"]]
    state = {**state, "items": items}
    return widgets.message_html(f"Re-cropped {Path(rec['source']).name}.", "ok"), gallery_items(state), state


def build(ctx: UIContext) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    cfg_cls = steps.prepare_config()
    mod = steps.prepare()
    missing = [m for m in (mod, cfg_cls) if isinstance(m, steps.Missing)]
    gr.Markdown("Photos in, training images out: each is cropped around the face and, if you like, cut out onto a "
                "plain background. Your photos are only read, never changed.")
    if missing:
        gr.HTML(widgets.message_html(missing[0].message(), "missing"))
    with gr.Row():
        with gr.Column(scale=2):
            src = gr.Textbox(label="Source folder", placeholder="folder with your photos", elem_id=ID + "src")
            names: list[str] = []
            controls: dict[str, Any] = {}
            if not isinstance(cfg_cls, steps.Missing):
                basic = [f.name for f in forms.fields(cfg_cls, "basic")]
                advanced = [f.name for f in forms.fields(cfg_cls, "advanced")]
                values = {"out": ctx.default_folder()}
                controls.update(forms.build(cfg_cls, basic, values, ID))
                with gr.Accordion("Advanced", open=False, elem_id=ID + "advanced"):
                    controls.update(forms.build(cfg_cls, advanced, values, ID))
                names = basic + advanced
            run = gr.Button("Prepare images", variant="primary", elem_id=ID + "run")
            stop = gr.Button("Stop", variant="stop", elem_id=ID + "stop")
            status = gr.HTML(elem_id=ID + "status")
            summary = gr.Textbox(label="Summary", lines=3, interactive=False, elem_id=ID + "summary")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Prepared images", columns=5, height=420, object_fit="contain",
                                 allow_preview=False, elem_id=ID + "gallery")
            with gr.Accordion("Adjust a crop", open=False, elem_id=ID + "crop_panel"):
                source = compat.image_input("Source (drag the crop box or its handles)", elem_id=ID + "source")
                info = gr.HTML(crop_info(None), elem_id=ID + "crop_info")
                with gr.Row():
                    x0 = gr.Number(label="Left", precision=0, elem_id=ID + "x0")
                    y0 = gr.Number(label="Top", precision=0, elem_id=ID + "y0")
                    x1 = gr.Number(label="Right", precision=0, elem_id=ID + "x1")
                    y1 = gr.Number(label="Bottom", precision=0, elem_id=ID + "y1")
                recrop_btn = gr.Button("Re-crop this image", elem_id=ID + "recrop")
                recrop_msg = gr.HTML()
            skipped = gr.Dataframe(headers=["file", "status", "reason"], value=[["", "", ""]], label="Skipped files and warnings",
                                   interactive=False, elem_id=ID + "skipped")
    state = gr.State({})
    index = gr.State(-1)
    box = [x0, y0, x1, y1]

    def _run(src_text: str, *vals: Any) -> Iterator[tuple]:
        yield from run_prepare(ctx, src_text, names, *vals)

    run_inputs = [src, *controls.values()]
    ctx.remember(*run_inputs)

    def _run_kept(*args: Any) -> Iterator[tuple]:
        ctx.keep(run_inputs, args)
        yield from _run(*args)

    outputs = [status, gallery, skipped, state, summary, run]
    event = run.click(_run_kept, run_inputs, outputs, **compat.event_kwargs())
    stop.click(stop_handler(ctx.runner, TAB), None, [status], **compat.event_kwargs())
    gallery.select(select_image, [state], [source, index, *box, info])
    source.select(move_box, [state, index, *box], [source, *box])
    for n in box:  # typed (or dragged, javascript/fast_lora.js) coordinates redraw the box
        n.change(preview_box, [state, index, *box], [source], **compat.event_kwargs())
    recrop_btn.click(lambda s, i, *b: recrop(ctx, s, i, *b), [state, index, *box], [recrop_msg, gallery, state])
    parts.update(src=src, controls=controls, names=names, run=run, stop=stop, status=status, gallery=gallery,
                 skipped=skipped, state=state, event=event, summary=summary, outputs=outputs,
                 source=source, box=box, crop_info=info, index=index, reattach=functools.partial(reattach, ctx))
    return parts
