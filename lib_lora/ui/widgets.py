"""Small renderers shared by the tabs: progress bar, loss chart, crop boxes, diffs."""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lib_lora.ui.forms import ui_text


def fmt_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "–"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def progress_html(done: int, total: int, text: str = "", eta: float | None = None, elapsed: float | None = None,
                  state: str = "running") -> str:
    """A progress bar the page re-renders every poll (no gradio-version specific widget)."""
    pct = 0.0 if total <= 0 else max(0.0, min(100.0, 100.0 * done / total))
    count = f"{done}/{total}" if total > 0 else ""
    bits = [b for b in (count, html.escape(ui_text(text))) if b]
    if state == "running" and eta is not None:
        bits.append(f"ETA {fmt_seconds(eta)}")
    if elapsed is not None:
        bits.append(f"elapsed {fmt_seconds(elapsed)}")
    return (
        f'<div class="fast-lora-progress fast-lora-{state}">'
        f'<div class="fast-lora-bar"><div class="fast-lora-fill" style="width:{pct:.1f}%"></div></div>'
        f'<div class="fast-lora-progress-text">{" · ".join(bits)}</div></div>'
    )


def message_html(text: str, kind: str = "info") -> str:
    """kind: info | ok | error | missing | stopped. Options the core names by their CLI flag are said as
    the page's labels (forms.ui_text)."""
    return f'<div class="fast-lora-msg fast-lora-msg-{kind}">{html.escape(ui_text(text), quote=False)}</div>'


def smoothed(values: list[float]) -> list[float]:
    """The chart's smoothed line: each point the mean of the last k values, k a tenth of the
    points (at least 2). The status line quotes its last value, so both say the same."""
    k = max(2, len(values) // 10)
    return [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]


def warnings_html(lines: list[str]) -> str:
    """The job's warnings (what the CLI prints as warnings), under its progress; '' when none."""
    if not lines:
        return ""
    items = "".join(f"<li>{html.escape(t, quote=False)}</li>" for t in lines)
    return f'<div class="fast-lora-warnings"><div class="fast-lora-warnings-title">Warnings</div><ul>{items}</ul></div>'


def ran_html(lines: list[str]) -> str:
    """What actually ran, where it differs from what the form says (e.g. the optimizer used)."""
    if not lines:
        return ""
    return '<div class="fast-lora-ran">' + "<br>".join(html.escape(t, quote=False) for t in lines) + "</div>"


def loss_chart(points: list[tuple[int, float]], title: str = "loss", width: int = 640, height: int = 280) -> Image.Image | None:
    """A line chart of (step, loss) with a moving average, as an image (same in every gradio)."""
    if not points:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)  # no pyplot: thread-safe, no GUI backend
    ax = fig.add_subplot(111)
    ax.plot(steps, losses, color="#9ab", linewidth=1, marker="." if len(losses) < 30 else None, label=title)
    if len(losses) >= 2:
        ax.plot(steps, smoothed(losses), color="#e05a00", linewidth=2, label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def draw_boxes(image: Image.Image, crop_box: Any = None, face_box: Any = None, max_side: int = 512) -> Image.Image:
    """The source image (scaled down) with the crop box (orange) and the face (cyan) drawn."""
    img = image.convert("RGB")
    scale = min(1.0, max_side / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    draw = ImageDraw.Draw(img)
    width = max(2, round(max(img.size) / 150))
    for box, color in ((face_box, (0, 200, 255)), (crop_box, (255, 120, 0))):
        if box is None:
            continue
        x0, y0, x1, y1 = (float(v) * scale for v in tuple(box)[:4])
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
    return img


def thumbnail(path: Any, side: int = 256) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side))
        return im.copy()


def diff_html(rows: list[tuple[str, list[str], list[tuple[str, str]], list[str]]], limit: int = 200) -> str:
    """rows: (image name, kept tags, removed (tag, reason), added tags) -> a readable diff table."""
    if not rows:
        return message_html("No changes: the preset leaves every caption as it is.", "info")
    out = ['<table class="fast-lora-diff"><tr><th>image</th><th>caption after the change</th></tr>']
    for name, kept, removed, added in rows[:limit]:
        tags = [f'<span class="tag-kept">{html.escape(t)}</span>' for t in kept]
        tags += [f'<del class="tag-removed" title="{html.escape(why)}">{html.escape(t)}</del>' for t, why in removed]
        tags += [f'<ins class="tag-added">{html.escape(t)}</ins>' for t in added]
        out.append(f"<tr><td>{html.escape(name)}</td><td>{' '.join(tags)}</td></tr>")
    out.append("</table>")
    if len(rows) > limit:
        out.append(f"<p>… and {len(rows) - limit} more images.</p>")
    return "".join(out)
