"""Step 4: edit tags. A gallery with each image's tags, the dataset's tag frequencies (click a
tag to see only its images), bulk add/remove/replace, rule presets previewed as a diff before
they are applied, undo/redo, and Chinese translations beside the tags when wanted.

Every edit goes through the tagging core's EditSession, which writes the caption files at once
and journals each step on disk (so undo survives a reload or a restart); this module only
shows and forwards. A session is opened per action, so edits from the CLI or the rules
presets are always seen.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from lib_lora.errors import UserError
from lib_lora.ui import compat, forms, steps, widgets
from lib_lora.ui.captions_view import find_image_dir
from lib_lora.ui.context import UIContext

ID = "fast_lora_edit_"
SCOPES = ["filtered images", "all images"]


def open_session(ctx: UIContext, folder: str) -> Any:
    mod = steps.session()
    if isinstance(mod, steps.Missing):
        raise UserError(mod.message())
    return mod.EditSession(find_image_dir(ctx.policy.check(folder, "image folder")))


def zh(session: Any, tag: str) -> str:
    try:
        return session.translations().get(tag) or ""
    except (OSError, UserError):  # no translation table in this build: show none
        return ""


# ---- views ----------------------------------------------------------------------------------

def freq_rows(session: Any, show_zh: bool) -> list[list[Any]]:
    rows = [[tag, int(n), zh(session, tag) if show_zh else ""] for tag, n in session.frequencies()]
    return rows or [["", 0, ""]]


def visible_names(session: Any, tag_filter: str) -> list[str]:
    tag_filter = (tag_filter or "").strip()
    return session.filter(all_of=[tag_filter]) if tag_filter else session.names()


def gallery_items(session: Any, names: list[str]) -> list[tuple[Any, str]]:
    return [(widgets.thumbnail(session.dir / n), ", ".join(session.captions[n])[:120]) for n in names]


def view(session: Any, tag_filter: str, show_zh: bool, message: str = "", kind: str = "info") -> tuple:
    """(status, frequency rows, gallery, shown names, selected-tags text)."""
    names = visible_names(session, tag_filter)
    shown = f"{len(names)} of {len(session.names())} images shown"
    hist = f"undo: {'yes' if session.can_undo() else 'no'}, redo: {'yes' if session.can_redo() else 'no'}"
    text = f"{message} ({shown}; {hist})" if message else f"{shown} ({hist})."
    return widgets.message_html(text, kind), freq_rows(session, show_zh), gallery_items(session, names), names, ""


def _tags(text: str) -> list[str]:
    return [t.strip() for t in str(text or "").split(",") if t.strip()]


def _scope(session: Any, scope: str, tag_filter: str) -> list[str] | None:
    """The images an edit applies to; None means all of them."""
    if scope == SCOPES[1] or not (tag_filter or "").strip():
        return None
    return visible_names(session, tag_filter)


# ---- handlers: (ctx, folder, filter, show_zh, *args) -> view ---------------------------------

def _guard(fn: Any, reopen: bool = False) -> Any:
    """`reopen`: the edit wrote the files through a session of its own (the rule presets), so
    the view reads them again instead of showing this session's captions from before."""
    def wrapped(ctx: UIContext, folder: str, tag_filter: str, show_zh: bool, *args: Any) -> tuple:
        try:
            session = open_session(ctx, folder)
            message = " ".join([*session.notes, fn(session, tag_filter, *args) or ""]).strip()
            if reopen:
                session = open_session(ctx, folder)
        except UserError as err:
            return (widgets.message_html(str(err), "error"), *(gr.update() for _ in range(4)))
        return view(session, tag_filter, show_zh, message or "", "ok" if message else "info")

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


@_guard
def load(session: Any, tag_filter: str) -> str:
    return ""


def toggle_zh(ctx: UIContext, folder: str, tag_filter: str, show_zh: bool) -> tuple:
    """The Chinese column switched: reload the folder, or change nothing while none is chosen (the
    standalone page sets the switch on open, before any folder is typed; Load still says it is empty)."""
    if not str(folder or "").strip():
        return tuple(gr.update() for _ in range(5))
    return load(ctx, folder, tag_filter, show_zh)


@_guard
def add_tags(session: Any, tag_filter: str, text: str, scope: str) -> str:
    tags = _tags(text)
    if not tags:
        raise UserError("Type the tags to add, separated by commas.")
    n = session.add(tags, names=_scope(session, scope, tag_filter))
    return f"Added {', '.join(tags)} to {n} images."


@_guard
def remove_tags(session: Any, tag_filter: str, text: str, scope: str) -> str:
    tags = _tags(text)
    if not tags:
        raise UserError("Type the tags to remove, separated by commas.")
    n = session.remove(tags, names=_scope(session, scope, tag_filter))
    return f"Removed {', '.join(tags)} from {n} images."


@_guard
def replace_tag(session: Any, tag_filter: str, old: str, new: str, scope: str) -> str:
    old, new = (old or "").strip(), (new or "").strip()
    if not old:
        raise UserError("Type the tag to replace.")
    n = session.replace(old, new, names=_scope(session, scope, tag_filter))
    return f"Replaced {old} with {new or '(nothing)'} in {n} images."


@_guard
def undo(session: Any, tag_filter: str) -> str:
    label = session.undo()
    return f"Undid: {label}." if label else "Nothing to undo."


@_guard
def redo(session: Any, tag_filter: str) -> str:
    label = session.redo()
    return f"Redid: {label}." if label else "Nothing to redo."


@_guard
def set_image_tags(session: Any, tag_filter: str, image: str, text: str) -> str:
    if not image:
        raise UserError("Select an image in the gallery first.")
    session.set_tags(image, _tags(text))
    return f"Updated the tags of {image}."


def _apply(session: Any, tag_filter: str, preset: str, trigger: str) -> str:
    rules = steps.rules()
    if isinstance(rules, steps.Missing):
        raise UserError(rules.message())
    diff = rules.apply_preset(session.dir, preset, trigger=(trigger or "").strip() or None)
    return f"Applied the {preset} rules: {len(diff.changed)} captions changed (Undo reverts them)."


apply = _guard(_apply, reopen=True)
apply.__name__ = "apply"


def select_image(ctx: UIContext, folder: str, shown: list[str], show_zh: bool, evt: gr.SelectData) -> tuple:
    """Gallery click -> (image name, its tags as text, tags with translations)."""
    idx = compat.select_index(evt)
    if not shown or idx is None or not (0 <= int(idx) < len(shown)):
        return "", "", ""
    try:
        session = open_session(ctx, folder)
    except UserError as err:
        return "", "", forms.ui_text(str(err))
    name = shown[int(idx)]
    tags = session.captions.get(name, [])
    translated = ", ".join(f"{t} ({zh(session, t)})" if zh(session, t) else t for t in tags) if show_zh else ""
    return name, ", ".join(tags), translated


def pick_tag(rows: Any, evt: gr.SelectData) -> Any:
    """A click in the frequency table filters the gallery by that row's tag."""
    idx = compat.select_index(evt)
    row = idx[0] if isinstance(idx, list | tuple) else idx
    try:
        data = rows.values.tolist() if hasattr(rows, "values") else rows
        return str(data[int(row)][0])
    except (TypeError, ValueError, IndexError):
        return gr.update()


def preview(ctx: UIContext, folder: str, preset: str, trigger: str) -> str:
    rules = steps.rules()
    if isinstance(rules, steps.Missing):
        return widgets.message_html(rules.message(), "missing")
    try:
        image_dir = find_image_dir(ctx.policy.check(folder, "image folder"))
        diff = rules.preview_preset(image_dir, preset, trigger=(trigger or "").strip() or None)
    except UserError as err:
        return widgets.message_html(str(err), "error")
    return diff_to_html(diff)


def diff_to_html(diff: Any) -> str:
    rows = []
    for name, d in sorted(diff.changed.items()):
        removed = [(t, why) for t, why in d.removed]
        added = list(d.added)
        kept = [t for t in d.after if t not in added]
        rows.append((name, kept, removed, added))
    removed_total, added_total = diff.totals()
    head = (f"Preset {diff.preset}: {len(diff.changed)} of {len(diff.diffs)} captions change; "
            f"{sum(removed_total.values())} tags removed, {sum(added_total.values())} added. "
            "Nothing is written until you apply.")
    return widgets.message_html(head, "info") + widgets.diff_html(rows)


def build(ctx: UIContext) -> dict[str, Any]:
    rules = steps.rules()
    missing = [m for m in (steps.session(), rules) if isinstance(m, steps.Missing)]
    gr.Markdown("Delete tags for what the LoRA should learn (face parts), keep what people will want to change by "
                "prompt (expression, hair, clothes, background). Every change is written at once and can be undone.")
    if missing:
        gr.HTML(widgets.message_html(missing[0].message(), "missing"))
    presets = list(getattr(rules, "PRESETS", {}) or []) if not isinstance(rules, steps.Missing) else []
    with gr.Row():
        folder = gr.Textbox(label="Image folder", placeholder="the tagged images (filled in by Prepare)",
                            elem_id=ID + "folder", scale=4)
        load_btn = gr.Button("Load", elem_id=ID + "load", scale=1)
        show_zh = gr.Checkbox(str(ctx.language).startswith("zh"), label="Show Chinese translations",
                              elem_id=ID + "show_zh", scale=1)
    status = gr.HTML(elem_id=ID + "status")
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                tag_filter = gr.Textbox(label="Filter by tag", placeholder="click a tag below", elem_id=ID + "filter")
                clear = gr.Button("Show all", elem_id=ID + "clear")
            freqs = gr.Dataframe(headers=["tag", "count", "translation"], value=[["", 0, ""]],
                                 label="Tags in the dataset (click one to filter)", interactive=False,
                                 elem_id=ID + "freqs")
            with gr.Accordion("Rule presets", open=True, elem_id=ID + "rules"):
                with gr.Row():
                    preset = gr.Dropdown(presets, value=presets[0] if presets else None, label="Preset",
                                         elem_id=ID + "preset")
                    trigger = gr.Textbox(label="Trigger word", placeholder="put first in every caption",
                                         elem_id=ID + "trigger")
                with gr.Row():
                    preview_btn = gr.Button("Preview changes", elem_id=ID + "preview")
                    apply_btn = gr.Button("Apply preset", variant="primary", elem_id=ID + "apply")
                diff = gr.HTML(elem_id=ID + "diff")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images", columns=5, height=360, object_fit="contain", allow_preview=False,
                                 elem_id=ID + "gallery")
            image = gr.Textbox(label="Selected image", interactive=False, elem_id=ID + "image")
            image_tags = gr.Textbox(label="Tags of the selected image", lines=2, elem_id=ID + "image_tags")
            image_zh = gr.Textbox(label="Translations", lines=2, interactive=False, elem_id=ID + "image_zh")
            set_btn = gr.Button("Set these tags", elem_id=ID + "set")
            with gr.Accordion("Bulk edit", open=True):
                scope = gr.Radio(SCOPES, value=SCOPES[0], label="Apply to", elem_id=ID + "scope")
                with gr.Row():
                    add_text = gr.Textbox(label="Tags to add", elem_id=ID + "add_text")
                    add_btn = gr.Button("Add", elem_id=ID + "add")
                with gr.Row():
                    remove_text = gr.Textbox(label="Tags to remove", elem_id=ID + "remove_text")
                    remove_btn = gr.Button("Remove", elem_id=ID + "remove")
                with gr.Row():
                    old = gr.Textbox(label="Replace tag", elem_id=ID + "old")
                    new = gr.Textbox(label="with", elem_id=ID + "new")
                    replace_btn = gr.Button("Replace", elem_id=ID + "replace")
            with gr.Row():
                undo_btn = gr.Button("Undo", elem_id=ID + "undo")
                redo_btn = gr.Button("Redo", elem_id=ID + "redo")
    shown = gr.State([])
    outs = [status, freqs, gallery, shown, image_tags]
    base = [folder, tag_filter, show_zh]

    ctx.remember(folder, preset, trigger)

    def bind(trigger_event: Any, fn: Any, extra: list[Any]) -> Any:
        def handler(*a: Any) -> tuple:
            ctx.keep(base + extra, a)  # the folder (and preset, trigger) come back after a reload
            return fn(ctx, *a)

        return trigger_event(handler, base + extra, outs)

    bind(load_btn.click, load, [])
    bind(folder.submit, load, [])
    bind(tag_filter.submit, load, [])
    bind(show_zh.change, toggle_zh, [])
    clear.click(lambda: "", None, [tag_filter]).then(lambda *a: load(ctx, *a), base, outs)
    freqs.select(pick_tag, [freqs], [tag_filter]).then(lambda *a: load(ctx, *a), base, outs)

    def _select(f: str, s: list[str], z: bool, evt: gr.SelectData) -> tuple:
        return select_image(ctx, f, s, z, evt)

    gallery.select(_select, [folder, shown, show_zh], [image, image_tags, image_zh])
    bind(add_btn.click, add_tags, [add_text, scope])
    bind(remove_btn.click, remove_tags, [remove_text, scope])
    bind(replace_btn.click, replace_tag, [old, new, scope])
    bind(undo_btn.click, undo, [])
    bind(redo_btn.click, redo, [])
    bind(set_btn.click, set_image_tags, [image, image_tags])
    preview_btn.click(lambda f, p, t: preview(ctx, f, p, t), [folder, preset, trigger], [diff])
    # The diff goes (it is applied); the outcome shows there, beside Apply, as well as at the top.
    bind(apply_btn.click, apply, [preset, trigger]).then(lambda message: message, [status], [diff])
    return dict(folder=folder, load=load_btn, show_zh=show_zh, status=status, filter=tag_filter, freqs=freqs,
                gallery=gallery, preset=preset, trigger=trigger, preview=preview_btn, apply=apply_btn, diff=diff,
                undo=undo_btn, redo=redo_btn, shown=shown)
