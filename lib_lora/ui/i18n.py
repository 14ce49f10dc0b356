"""The page's translatable strings, for localizations/<lang>.json (A1111's format:
{"English text": "translation"}, matched against whole text nodes, placeholders and titles)."""

from __future__ import annotations

from typing import Any

import gradio as gr


def markdown_texts(text: str) -> list[str]:
    """The text nodes a page shows for a plain Markdown value (one per line, without the
    heading and list marks): what a translation map is matched against."""
    out = []
    for line in str(text).splitlines():
        line = line.strip().lstrip("#*-> ").strip()
        if line:
            out.append(line)
    return out


def ui_strings(blocks: gr.Blocks, with_info: bool = False, with_choices: bool = True,
               with_markdown: bool = False) -> set[str]:
    """Labels, button texts, tab and accordion titles, placeholders and choices of a Blocks;
    help lines (info) and the static Markdown's texts when asked."""
    out: set[str] = set()
    for block in blocks.blocks.values():
        if with_markdown and isinstance(block, gr.Markdown) and isinstance(block.value, str):
            out.update(markdown_texts(block.value))
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
