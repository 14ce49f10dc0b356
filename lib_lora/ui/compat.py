"""The few places where gradio 3.41 (A1111 v1.10) and gradio 4.40+ (Forge) differ.

Everything else in lib_lora.ui uses the API the two share: Blocks, Tabs, Accordion, Row,
Column, Textbox, Number, Slider, Checkbox, Dropdown, Radio, Button, Gallery, Image,
Dataframe, HTML, Markdown, State, `.click/.change/.select/.then`, `gr.update`.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

GRADIO_VERSION = gr.__version__
GRADIO_MAJOR = int(GRADIO_VERSION.split(".")[0])


def js(code: str) -> dict[str, str]:
    """Keyword for a client-side function on an event: `_js` in gradio 3, `js` in gradio 4."""
    return {"_js": code} if GRADIO_MAJOR < 4 else {"js": code}


def enable_queue(blocks: gr.Blocks, workers: int = 8) -> gr.Blocks:
    """Let several events run at once, so a Stop click is not queued behind the running job."""
    if GRADIO_MAJOR < 4:
        return blocks.queue(concurrency_count=workers)
    return blocks.queue(default_concurrency_limit=workers)


def event_kwargs(**kw: Any) -> dict[str, Any]:
    """Per-event options: gradio 4 limits each event to one run at a time unless told."""
    if GRADIO_MAJOR >= 4:
        kw.setdefault("concurrency_limit", None)
    return kw


def select_index(evt: Any) -> Any:
    """The index carried by a gr.SelectData (an int for galleries, [row, col] for tables)."""
    return getattr(evt, "index", None)


def update(**kw: Any) -> Any:
    return gr.update(**kw)


def image_input(label: str, **kw: Any) -> gr.Image:
    """A non-editable image that reports clicks (for moving a crop box)."""
    if GRADIO_MAJOR < 4:
        return gr.Image(label=label, type="pil", interactive=False, **kw)
    return gr.Image(label=label, type="pil", interactive=False, show_download_button=False, **kw)


def launch(blocks: gr.Blocks, host: str, port: int, allowed_paths: list[str] | None = None,
           auth: list[tuple[str, str]] | None = None, **kw: Any) -> Any:
    """Start the server; files are served only from `allowed_paths` (and gradio's upload folder),
    whatever the current folder is and whatever gradio's own rules would allow (`serving.FileGuard`)."""
    from lib_lora.ui.serving import guard_kwargs

    kw.setdefault("prevent_thread_lock", True)
    kw.setdefault("show_api", False)
    return blocks.launch(
        server_name=host, server_port=port, allowed_paths=allowed_paths or [], quiet=True, auth=auth or None,
        app_kwargs=guard_kwargs(allowed_paths or []), **kw
    )
