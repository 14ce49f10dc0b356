"""The page: five tabs for the seven steps, shared by the WebUI and the standalone app.

`build_tabs(host)` is what the WebUI mounts as its tab; `build_app(host)` wraps the same
tabs in a standalone page with a title, the stylesheet, and a language switch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr

from lib_lora.hosts.base import Host
from lib_lora.ui import compat, memory, tab_edit, tab_prepare, tab_tag, tab_test, tab_train
from lib_lora.ui.context import UIContext
from lib_lora.ui.paths import FolderPolicy

ROOT = Path(__file__).resolve().parents[2]  # the extension's folder (style.css, javascript/, localizations/)
LANGUAGES = {"English": "en", "中文": "zh_CN"}
# (key, title, module) of the sub-tabs, in the order of the seven steps.
TABS = (("prepare", "1-2 Prepare", tab_prepare), ("tag", "3 Tag", tab_tag), ("edit", "4 Edit tags", tab_edit),
        ("train", "5-6 Train", tab_train), ("test", "7 Test", tab_test))


def asset(*parts: str) -> Path:
    return ROOT.joinpath(*parts)


def read_asset(*parts: str) -> str:
    path = asset(*parts)
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def localization(lang: str) -> dict[str, str]:
    """A1111-format translations ({english: translated}) for our labels; {} for English."""
    if lang == "en":
        return {}
    text = read_asset("localizations", f"{lang}.json")
    return json.loads(text) if text else {}


def build_tabs(host: Host, policy: FolderPolicy | None = None, language: str | None = None) -> gr.Blocks:
    """The tabs as one Blocks; the WebUI renders it inside its own page."""
    ctx = UIContext(host=host, policy=policy or FolderPolicy(), language=language or getattr(host, "language", "en"))
    with gr.Blocks(analytics_enabled=False, elem_id="fast_lora") as blocks:
        if ctx.policy.restricted:
            gr.Markdown(f"Folders are limited to: {ctx.policy.describe()}", elem_id="fast_lora_roots")
        with gr.Tabs(elem_id="fast_lora_tabs"):
            for key, title, module in TABS:
                with gr.Tab(title, elem_id=f"fast_lora_tab_{key}") as tab:
                    ctx.parts[key] = module.build(ctx)
                scope_saved_defaults(tab, f"fast_lora_{key}")
        _do_not_save(ctx)
        _link_tabs(ctx)
        _on_load(blocks, ctx)
    blocks.fast_lora = ctx  # type: ignore[attr-defined]  # for tests and the hosts
    return blocks


def scope_saved_defaults(block: Any, scope: str) -> None:
    """Give every component under `block` its own key in the WebUI's ui-config.json.

    The WebUI saves a component's default under "<tab id>/<label>/<field>" (modules/ui_loadsave.py),
    so the sub-tabs' repeated labels ("Batch size", "Seed", "Preset", ...) would share one key and the
    first one registered would set the others' defaults. A component carrying `custom_script_source`
    is saved under "customscript/<source>/..." instead (the WebUI marks its scripts' components so);
    one source per sub-tab makes every key unique and keeps it stable across starts."""
    block.custom_script_source = scope
    for child in getattr(block, "children", None) or []:
        scope_saved_defaults(child, scope)


def _do_not_save(ctx: UIContext) -> None:
    """Defaults that follow the host rather than the user (the work folder setting, the newest LoRA,
    the UI language) are left out of ui-config.json, where the first start would pin them."""
    host_derived = [ctx.parts["prepare"].get("controls", {}).get("out"), ctx.parts["test"].get("lora"),
                    ctx.parts["edit"].get("show_zh")]
    for comp in host_derived:
        if comp is not None:
            comp.do_not_save_to_config = True


def _link_tabs(ctx: UIContext) -> None:
    """Each step's output becomes the next step's input: a prepared folder flows to Tag, Edit
    and Train; tagging refreshes Edit; a trained LoRA is selected in Test."""
    prep, tag, edit, train, test = (ctx.parts[k] for k in ("prepare", "tag", "edit", "train", "test"))

    def after_prepare(state: dict[str, Any], *current: Any) -> tuple:
        if not state or not state.get("image_dir"):
            return tuple(gr.update() for _ in current)
        return state["image_dir"], state["image_dir"], state["train_dir"]

    prep["event"].then(after_prepare, [prep["state"], tag["folder"], edit["folder"], train["dataset"]],
                       [tag["folder"], edit["folder"], train["dataset"]])

    train["event"].then(_after_train(ctx), [train["lora_name"], test["lora"]], [test["lora"]])
    if "name" in prep.get("controls", {}):
        # The dataset's name is the natural LoRA name.
        prep["controls"]["name"].change(lambda n, cur: n if n and not cur else gr.update(),
                                        [prep["controls"]["name"], train["name"]], [train["name"]])


def restore_values(ctx: UIContext) -> list[Any]:
    """The remembered controls' last used values (a no-op update where there is none)."""
    saved = ctx.memory.load()
    return [memory.restore_update(comp, saved.get(key)) for key, comp in ctx.remembered.items()]


def _on_load(blocks: gr.Blocks, ctx: UIContext) -> None:
    """A page (re)load gets the last used values back and reattaches to each tab's running or
    last job: jobs live on the server, the page only watches them. The Test tab's LoRA list is
    read again (the page is otherwise served as it was built at start)."""
    fields = list(ctx.remembered.values())
    restored = blocks.load(lambda: restore_values(ctx), None, fields) if fields else None
    test = ctx.parts["test"]
    blocks.load(test["remembered_lora"], None, [test["lora"]])
    train = ctx.parts["train"]
    if "base_model" not in train["controls"]:  # the host's loaded checkpoint: its family may have changed
        # After the last used values are back: values left as the old family filled them then
        # take the loaded model's family's (run first, the restore would put the old ones back).
        fn, inputs, outputs = train["refresh"]
        (restored.then if restored is not None else blocks.load)(fn, inputs, outputs)
    for key in ("prepare", "tag", "train", "test"):
        part = ctx.parts[key]
        attached = blocks.load(part["reattach"], None, part["outputs"], **compat.event_kwargs())
        if key == "train":  # a run watched from a reloaded page also lands in the Test tab's list
            attached.then(_after_train(ctx), [part["lora_name"], test["lora"]], [test["lora"]])


def save_values(ctx: UIContext, *values: Any) -> None:
    """Every remembered control's current value (before the language switch reloads the page)."""
    ctx.keep(list(ctx.remembered.values()), values)


def _after_train(ctx: UIContext) -> Any:
    """The Test tab's LoRA list read again, the new LoRA selected."""

    def after_train(lora_name: str, current: str) -> Any:
        return ctx.parts["test"]["refresh_fn"](lora_name or current)

    return after_train


def i18n_script() -> str:
    """Client code for the standalone page: translate labels (A1111's localization format)
    and remember the language choice. Inside the WebUI, A1111's own localization does this."""
    maps = {code: localization(code) for code in LANGUAGES.values() if code != "en"}
    js = read_asset("javascript", "fast_lora.js")
    return (
        "() => {\n" + js + "\n"
        f"return fastLoraStandaloneInit({json.dumps(maps, ensure_ascii=False)}, {json.dumps(LANGUAGES, ensure_ascii=False)});\n"
        "}"
    )


def build_app(host: Host, policy: FolderPolicy | None = None) -> gr.Blocks:
    """The standalone page."""
    css = read_asset("style.css")
    with gr.Blocks(title="Fast LoRA", css=css, analytics_enabled=False, elem_id="fast_lora_app") as app:
        with gr.Row(elem_id="fast_lora_header"):
            with gr.Column(scale=4):
                gr.Markdown("# Fast LoRA\nPhotos in, a working SD1.5 LoRA out: prepare → tag → edit → train → test.")
            with gr.Column(scale=1, min_width=220):
                lang = gr.Radio(list(LANGUAGES), value="English", label="Language", elem_id="fast_lora_lang")
        tabs = build_tabs(host, policy)  # created inside this Blocks, so it renders here
        ctx: UIContext = tabs.fast_lora  # type: ignore[attr-defined]
        show_zh = ctx.parts["edit"].get("show_zh")
        # The switch reloads the page in the other language: the fields are saved first (they come
        # back on load) and the open tab is noted for the reloaded page (fastLoraStandaloneInit).
        fields = list(ctx.remembered.values())
        lang.input(lambda *v: save_values(ctx, *v), fields, None).then(None, [lang], None, **compat.js(
            "(v) => { if ((localStorage.getItem('fast_lora_lang') || 'English') !== v) { "
            "localStorage.setItem('fast_lora_lang', v); "
            "const app = document.querySelector('gradio-app'); const root = (app && app.shadowRoot) || document; "
            "const tabs = [...root.querySelectorAll('#fast_lora_tabs .tab-nav button')]; "
            "sessionStorage.setItem('fast_lora_tab', String(tabs.findIndex((b) => b.classList.contains('selected')))); "
            "window.location.reload(); } return []; }"))
        app.load(None, None, [lang, show_zh] if show_zh is not None else [lang], **compat.js(i18n_script()))
    app.fast_lora = ctx  # type: ignore[attr-defined]
    return app
