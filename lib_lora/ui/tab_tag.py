"""Step 3: auto-tag the prepared images with a tagger, with progress; the tags per image shown."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import gradio as gr

from lib_lora.errors import UserError
from lib_lora.ui import captions_view, compat, forms, steps, widgets
from lib_lora.ui.context import UIContext
from lib_lora.ui.jobs import job_updates, stop_handler

ID = "fast_lora_tag_"
TAB = "tag"  # the runner's key for this tab's jobs
# Fields of TagConfig that belong to step 4 (rules); the Edit tab handles those.
RULE_FIELDS = {"preset", "blacklist", "whitelist", "implications_file", "aliases_file"}


def make_tagger(ctx: UIContext, cfg: Any) -> Any:
    """The config's tagger, with the same score floor as the CLI's (`TagConfig.tagger_floor`)."""
    if cfg.tagger == "webui":
        tagger = ctx.host.tagger(cfg.tagger_floor())
        if tagger is None:
            raise UserError("This host has no built-in tagger; choose deepdanbooru or wd14.")
        return tagger
    mod = steps.taggers()
    if isinstance(mod, steps.Missing):
        raise UserError(mod.message())
    return mod.tagger_for(cfg)


def run_tag(ctx: UIContext, folder: str, names: list[str], *values: Any) -> Iterator[tuple]:
    """Generator handler: (progress html, gallery, caption rows, Tag button)."""
    cap, cfg_cls = steps.captions(), steps.tag_config()
    for m in (cap, cfg_cls):
        if isinstance(m, steps.Missing):
            yield widgets.message_html(m.message(), "missing"), gr.update(), gr.update(), gr.update(interactive=True)
            return
    try:
        image_dir = captions_view.find_image_dir(ctx.policy.check(folder, "image folder"))
        cfg = forms.collect(cfg_cls, names, list(values), policy=ctx.policy)

        def work(p: Any) -> Any:
            p.update(0, 1, "loading the tagger")
            tagger = make_tagger(ctx, cfg)
            return cap.tag_dataset(image_dir, tagger, cfg, progress=p)

        job = ctx.runner.start("Tag images", work, tab=TAB, view={"image_dir": image_dir})
    except UserError as err:
        yield widgets.message_html(str(err), "error"), gr.update(), gr.update(), gr.update(interactive=True)
        return
    yield from follow_tag(job)


def follow_tag(job: Any) -> Iterator[tuple]:
    """(status, gallery, caption rows, Tag button): the shown captions are cleared while tagging
    rewrites them, and come back from the files when it ends."""
    busy, idle = gr.update(interactive=False), gr.update(interactive=True)
    yield widgets.progress_html(0, 0, "starting"), [], [["", ""]], busy
    for j in job_updates(job):
        p = j.progress
        if j.running:
            yield (widgets.progress_html(p.done, p.total, p.text, p.eta_seconds(), p.elapsed())
                   + widgets.warnings_html(p.warnings), gr.update(), gr.update(), busy)
    tail = widgets.warnings_html(job.progress.warnings)
    if job.error or job.cancelled:
        kind = "error" if job.error else "stopped"
        yield widgets.message_html(job.error or "Stopped.", kind) + tail, gr.update(), gr.update(), idle
        return
    image_dir = job.view.get("image_dir")
    rows = captions_view.caption_rows(image_dir)
    text = f"Tagged {len(rows)} images in {image_dir}."
    summary = getattr(job.result, "summary", None)
    if callable(summary):
        text = str(summary())
    yield (widgets.progress_html(len(rows), len(rows), text, None, job.progress.elapsed(), state="done") + tail,
           gallery_of(image_dir), rows or [["", ""]], idle)


def reattach(ctx: UIContext) -> Iterator[tuple]:
    """On page load: the running or last tagging of this tab."""
    job = ctx.runner.job_for(TAB)
    if job is None or not job.view.get("image_dir"):
        yield (gr.update(),) * 4
        return
    yield from follow_tag(job)


def gallery_of(image_dir: Any) -> list[tuple[Any, str]]:
    return [(widgets.thumbnail(p), captions_view.caption_of(p)[:120]) for p in captions_view.images_in(image_dir)]


def show_folder(ctx: UIContext, folder: str) -> tuple:
    try:
        image_dir = captions_view.find_image_dir(ctx.policy.check(folder, "image folder"))
    except UserError as err:
        return widgets.message_html(str(err), "error"), gr.update(), gr.update()
    rows = captions_view.caption_rows(image_dir)
    return widgets.message_html(f"{len(rows)} images in {image_dir}.", "info"), gallery_of(image_dir), rows or [["", ""]]


def default_values(ctx: UIContext) -> dict[str, Any]:
    """The host's own tagger when it has one (the WebUI's Deepbooru: nothing to download)."""
    return {"tagger": "webui"} if ctx.host.tagger(0.5) is not None else {}


def build(ctx: UIContext) -> dict[str, Any]:
    cfg_cls = steps.tag_config()
    missing = [m for m in (cfg_cls, steps.captions(), steps.taggers()) if isinstance(m, steps.Missing)]
    gr.Markdown("Write a caption (comma-separated tags) beside every image, like A1111's Deepbooru pre-processing.")
    if missing:
        gr.HTML(widgets.message_html(missing[0].message(), "missing"))
    names: list[str] = []
    controls: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=2):
            folder = gr.Textbox(label="Image folder", placeholder="the prepared images (filled in by Prepare)",
                                elem_id=ID + "folder")
            if not isinstance(cfg_cls, steps.Missing):
                basic = [f.name for f in forms.fields(cfg_cls, "basic", skip=RULE_FIELDS)]
                advanced = [f.name for f in forms.fields(cfg_cls, "advanced", skip=RULE_FIELDS)]
                defaults = default_values(ctx)
                controls.update(forms.build(cfg_cls, basic, defaults, ID))
                with gr.Accordion("Advanced", open=False, elem_id=ID + "advanced"):
                    controls.update(forms.build(cfg_cls, advanced, defaults, ID))
                names = basic + advanced
            with gr.Row():
                run = gr.Button("Tag images", variant="primary", elem_id=ID + "run")
                stop = gr.Button("Stop", variant="stop", elem_id=ID + "stop")
                show = gr.Button("Show captions", elem_id=ID + "show")
            status = gr.HTML(elem_id=ID + "status")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images and their tags", columns=5, height=360, object_fit="contain",
                                 allow_preview=True, elem_id=ID + "gallery")
            table = gr.Dataframe(headers=["image", "tags"], value=[["", ""]], label="Tags per image",
                                 interactive=False, wrap=True, elem_id=ID + "table")

    def _run(folder_text: str, *vals: Any) -> Iterator[tuple]:
        yield from run_tag(ctx, folder_text, names, *vals)

    run_inputs = [folder, *controls.values()]
    ctx.remember(*run_inputs)

    def _run_kept(*args: Any) -> Iterator[tuple]:
        ctx.keep(run_inputs, args)
        yield from _run(*args)

    outputs = [status, gallery, table, run]
    event = run.click(_run_kept, run_inputs, outputs, **compat.event_kwargs())
    stop.click(stop_handler(ctx.runner, TAB), None, [status], **compat.event_kwargs())
    show.click(lambda f: show_folder(ctx, f), [folder], [status, gallery, table])
    return dict(folder=folder, controls=controls, names=names, run=run, stop=stop, status=status, gallery=gallery,
                table=table, event=event, outputs=outputs, reattach=functools.partial(reattach, ctx))

