"""The page's translatable strings, for localizations/<lang>.json (A1111's format:
{"English text": "translation"}, matched against whole text nodes, placeholders and titles)."""

from __future__ import annotations

from typing import Any

import gradio as gr


def ui_strings(blocks: gr.Blocks, with_info: bool = False, with_choices: bool = True) -> set[str]:
    """Labels, button texts, tab and accordion titles, placeholders and choices of a Blocks."""
    out: set[str] = set()
    for block in blocks.blocks.values():
        for attr in ("label", "placeholder") + (("info",) if with_info else ()):
            value = getattr(block, attr, None)
            if isinstance(value, str) and value.strip():
                out.add(value.strip())
        if isinstance(block, gr.Button) and isinstance(block.value, str):
            out.add(block.value.strip())
        choices: Any = getattr(block, "choices", None)
        if with_choices and isinstance(block, gr.Radio | gr.Dropdown) and choices:
            for c in choices:
                c = c[0] if isinstance(c, tuple | list) else c
                if isinstance(c, str) and c.strip():
                    out.add(c.strip())
        headers = getattr(block, "headers", None)
        if isinstance(block, gr.Dataframe) and headers:
            out.update(h for h in headers if isinstance(h, str))
    return out
