"""Step 4: edit tags. A gallery with each image's tags, the dataset's tag frequencies (click a
tag to see only its images), bulk add/remove/replace, rule presets previewed as a diff before
they are applied, undo/redo, and Chinese translations beside the tags when wanted.

All edits go through the tagging core's EditSession (journaled, undoable); this module only
shows them. One session per folder is kept for the page, so undo survives a reload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from lib_lora.errors import UserError
from lib_lora.ui import compat, steps, widgets
from lib_lora.ui.context import UIContext

ID = "fast_lora_edit_"
SCOPES = ["filtered images", "all images"]


# ---- the tagging core, through its contract -------------------------------------------------

def open_session(ctx: UIContext, folder: str, reload: bool = False) -> Any:
    mod = steps.session()
    if isinstance(mod, steps.Missing):
        raise UserError(mod.message())
    from lib_lora.ui.captions_view import find_image_dir

    image_dir = find_image_dir(ctx.policy.check(folder, "image folder"))
    key = str(image_dir)
    if reload or key not in ctx.sessions:
        ctx.sessions[key] = mod.EditSession(image_dir)
    return ctx.sessions[key]


def translations() -> dict[str, str]:
    """English tag -> Chinese, from the tagging core's data (empty when it has none)."""
    mod = steps.load("lib_lora.tagging.translate", ("translate",), "Tag translations")
    if isinstance(mod, steps.Missing):
        return {}
    table = getattr(mod, "TABLE", None) or getattr(mod, "load_table", lambda *_: {})("zh_CN")
    return dict(table or {})


def translate(tag: str, table: dict[str, str]) -> str:
    return table.get(tag, table.get(tag.replace(" ", "_"), ""))


# ---- views ----------------------------------------------------------------------------------

def freq_rows(session: Any, show_zh: bool) -> list[list[Any]]:
    freqs = session.frequencies()
    items = freqs.items() if isinstance(freqs, dict) else freqs
    table = translations() if show_zh else {}
    rows = [[tag, int(n), translate(tag, table)] for tag, n in sorted(items, key=lambda kv: (-kv[1], kv[0]))]
    return rows or [["", 0, ""]]


def visible_images(session: Any, tag_filter: str) -> list[Path]:
    tag_filter = (tag_filter or "").strip()
    return [Path(p) for p in (session.filter(tag_filter) if tag_filter else session.images())]


def tags_of(session: Any, image: Path) -> list[str]:
    return list(session.tags(image))


def gallery_items(session: Any, images: list[Path]) -> list[tuple[Any, str]]:
    return [(widgets.thumbnail(p), ", ".join(tags_of(session, p))[:120]) for p in images]


def view(session: Any, tag_filter: str, show_zh: bool, message: str = "", kind: str = "info") -> tuple:
    """(status, frequency rows, gallery, image list state, selected-tags text)."""
    images = visible_images(session, tag_filter)
    undo, redo = _can(session, "undo"), _can(session, "redo")
    text = message or f"{len(images)} images shown."
    status = widgets.message_html(f"{text}  (undo: {undo}, redo: {redo}, unsaved changes: {_dirty(session)})", kind)
    return status, freq_rows(session, show_zh), gallery_items(session, images), [str(p) for p in images], ""


def _can(session: Any, what: str) -> int:
    v = getattr(session, f"can_{what}", None)
    v = v() if callable(v) else v
    return int(v or 0) if not isinstance(v, bool) else int(v)


def _dirty(session: Any) -> str:
    v = getattr(session, "dirty", None)
    v = v() if callable(v) else v
    return "yes" if v else "no"


def _tags(text: str) -> list[str]:
    return [t.strip() for t in str(text or "").split(",") if t.strip()]


def _scope(session: Any, scope: str, tag_filter: str) -> list[Path] | None:
    """None means every image (the session's own default)."""
    if scope == SCOPES[1] or not (tag_filter or "").strip():
        return None
    return visible_images(session, tag_filter)


# ---- handlers -------------------------------------------------------------------------------

def _guard(fn: Any) -> Any:
    def wrapped(ctx: UIContext, folder: str, tag_filter: str, show_zh: bool, *args: Any) -> tuple:
        try:
            session = open_session(ctx, folder)
            message = fn(session, tag_filter, *args)
        except UserError as err:
            return (widgets.message_html(str(err), "error"), *(gr.update() for _ in range(4)))
        return view(session, tag_filter, show_zh, message or "", "ok")

    wrapped.__name__ = fn.__name__
    return wrapped


def load(ctx: UIContext, folder: str, tag_filter: str, show_zh: bool) -> tuple:
    try:
        session = open_session(ctx, folder, reload=False)
    except UserError as err:
        return (widgets.message_html(str(err), "error"), *(gr.update() for _ in range(4)))
    return view(session, tag_filter, show_zh)


@_guard
def add_tags(session: Any, tag_filter: str, text: str, scope: str) -> str:
    tags = _tags(text)
    if not tags:
        raise UserError("Type the tags to add, separated by commas.")
    n = session.add(tags, images=_scope(session, scope, tag_filter))
    return f"Added {', '.join(tags)}" + (f" to {n} images." if isinstance(n, int) else ".")


@_guard
def remove_tags(session: Any, tag_filter: str, text: str, scope: str) -> str:
    tags = _tags(text)
    if not tags:
        raise UserError("Type the tags to remove, separated by commas.")
    n = session.remove(tags, images=_scope(session, scope, tag_filter))
    return f"Removed {', '.join(tags)}" + (f" from {n} images." if isinstance(n, int) else ".")


@_guard
def replace_tag(session: Any, tag_filter: str, old: str, new: str, scope: str) -> str:
    old, new = (old or "").strip(), (new or "").strip()
    if not old:
        raise UserError("Type the tag to replace.")
    n = session.replace(old, new, images=_scope(session, scope, tag_filter))
    return f"Replaced {old} with {new or '(nothing)'}" + (f" in {n} images." if isinstance(n, int) else ".")


@_guard
def undo(session: Any, tag_filter: str) -> str:
    return "Undone." if session.undo() else "Nothing to undo."


@_guard
def redo(session: Any, tag_filter: str) -> str:
    return "Redone." if session.redo() else "Nothing to redo."


@_guard
def save(session: Any, tag_filter: str) -> str:
    n = session.save()
    return f"Saved {n} captions." if isinstance(n, int) else "Saved."


@_guard
def set_image_tags(session: Any, tag_filter: str, image: str, text: str) -> str:
    if not image:
        raise UserError("Select an image in the gallery first.")
    session.set_tags(Path(image), _tags(text))
    return f"Updated the tags of {Path(image).name}."


def select_image(ctx: UIContext, folder: str, shown: list[str], show_zh: bool, evt: gr.SelectData) -> tuple:
    """Gallery click -> (image path, its tags as text, translations)."""
    idx = compat.select_index(evt)
    if not shown or idx is None or not (0 <= int(idx) < len(shown)):
        return "", "", ""
    try:
        session = open_session(ctx, folder)
    except UserError as err:
        return "", "", str(err)
    image = shown[int(idx)]
    tags = tags_of(session, Path(image))
    table = translations() if show_zh else {}
    zh = ", ".join(f"{t} ({translate(t, table)})" if translate(t, table) else t for t in tags) if show_zh else ""
    return image, ", ".join(tags), zh


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
        session = open_session(ctx, folder)
        diff = rules.preview_preset(session.image_dir if hasattr(session, "image_dir") else folder, preset,
                                    trigger=(trigger or "").strip() or None)
    except UserError as err:
        return widgets.message_html(str(err), "error")
    return diff_to_html(diff)


def diff_to_html(diff: Any) -> str:
    rows = []
    for change in getattr(diff, "changes", []) or []:
        before, after = list(change.before), list(change.after)
        kept = [t for t in after if t in before]
        rows.append((Path(change.image).name, kept, [t for t in before if t not in after],
                     [t for t in after if t not in before]))
    head = diff.summary() if hasattr(diff, "summary") else ""
    return (widgets.message_html(head, "info") if head else "") + widgets.diff_html(rows)


@_guard
def apply(session: Any, tag_filter: str, rules_mod: Any, preset: str, trigger: str) -> str:
    diff = rules_mod.apply_preset(session, preset, trigger=(trigger or "").strip() or None)
    n = len(getattr(diff, "changes", []) or [])
    return f"Applied the {preset} rules to {n} images (undo reverts them)."


def build(ctx: UIContext) -> dict[str, Any]:
    rules = steps.rules()
    missing = [m for m in (steps.session(), rules) if isinstance(m, steps.Missing)]
    gr.Markdown("Delete tags for what the LoRA should learn (face parts), keep what people will want to change by "
                "prompt (expression, hair, clothes, background). Nothing is written until you press Save.")
    if missing:
        gr.HTML(widgets.message_html(missing[0].message(), "missing"))
    presets = list(getattr(rules, "PRESETS", {}) or []) if not isinstance(rules, steps.Missing) else []
    with gr.Row():
        folder = gr.Textbox(label="Image folder", placeholder="the tagged images (filled in by Prepare)",
                            elem_id=ID + "folder", scale=4)
        load_btn = gr.Button("Load", elem_id=ID + "load", scale=1)
        show_zh = gr.Checkbox(ctx.language == "zh_CN", label="Show Chinese translations", elem_id=ID + "show_zh",
                              scale=1)
    status = gr.HTML(elem_id=ID + "status")
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                tag_filter = gr.Textbox(label="Filter by tag", placeholder="click a tag below", elem_id=ID + "filter")
                clear = gr.Button("Show all", elem_id=ID + "clear")
            freqs = gr.Dataframe(headers=["tag", "count", "translation"], value=[["", 0, ""]], label="Tags in the dataset (click one to filter)",
                                 interactive=False, elem_id=ID + "freqs")
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
                save_btn = gr.Button("Save", variant="primary", elem_id=ID + "save")
    shown = gr.State([])
    outs = [status, freqs, gallery, shown, image_tags]
    base = [folder, tag_filter, show_zh]

    def bind(btn: Any, fn: Any, extra: list[Any], *fixed: Any) -> None:
        btn.click(lambda *a: fn(ctx, *a[:3], *fixed, *a[3:]), base + extra, outs)

    load_btn.click(lambda *a: load(ctx, *a), base, outs)
    folder.submit(lambda *a: load(ctx, *a), base, outs)
    tag_filter.submit(lambda *a: load(ctx, *a), base, outs)
    show_zh.change(lambda *a: load(ctx, *a), base, outs)
    clear.click(lambda: "", None, [tag_filter]).then(lambda *a: load(ctx, *a), base, outs)
    freqs.select(pick_tag, [freqs], [tag_filter]).then(lambda *a: load(ctx, *a), base, outs)
    def _select(f: str, s: list[str], z: bool, evt: gr.SelectData) -> tuple:
        return select_image(ctx, f, s, z, evt)

    gallery.select(_select, [folder, shown, show_zh], [image, image_tags, image_zh])
    bind(add_btn, add_tags, [add_text, scope])
    bind(remove_btn, remove_tags, [remove_text, scope])
    bind(replace_btn, replace_tag, [old, new, scope])
    bind(undo_btn, undo, [])
    bind(redo_btn, redo, [])
    bind(save_btn, save, [])
    set_btn.click(lambda *a: set_image_tags(ctx, *a), base + [image, image_tags], outs)
    preview_btn.click(lambda f, p, t: preview(ctx, f, p, t), [folder, preset, trigger], [diff])
    if not isinstance(rules, steps.Missing):
        bind(apply_btn, apply, [preset, trigger], rules)
    return dict(folder=folder, load=load_btn, show_zh=show_zh, status=status, filter=tag_filter, freqs=freqs,
                gallery=gallery, preset=preset, trigger=trigger, preview=preview_btn, apply=apply_btn, diff=diff,
                undo=undo_btn, redo=redo_btn, save=save_btn, shown=shown)
