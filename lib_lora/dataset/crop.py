"""Crop geometry: boxes in full-resolution, oriented source pixels, and output sizes.

Pure functions over numbers and small arrays, so each rule can be tested on its own.
A box is (x0, y0, x1, y1) with x1/y1 exclusive.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from lib_lora.dataset.faces import Face

Box = tuple[int, int, int, int]

# Head-and-shoulders framing relative to a detector's face box (brows to chin, cheek to
# cheek): the square is this many face-box sides wide, and the face centre sits this far
# down from its top, leaving room for hair above and shoulders below.
FACE_SIDE_FACTOR = 2.8
FACE_CENTER_FROM_TOP = 0.42
BUCKET_STEP = 64


def _place(cx: float, cy: float, bw: int, bh: int, W: int, H: int) -> Box:
    """A bw x bh box centred on (cx, cy), shifted (not shrunk) to lie inside W x H."""
    bw, bh = min(bw, W), min(bh, H)
    x0 = int(round(min(max(cx - bw / 2, 0), W - bw)))
    y0 = int(round(min(max(cy - bh / 2, 0), H - bh)))
    return (x0, y0, x0 + bw, y0 + bh)


def face_square(face: Face, W: int, H: int, min_side: int = 0) -> Box:
    """A head-and-shoulders square around `face`, clamped to the image.

    `min_side` widens a tight framing (a small face in a small photo) up to the output size
    when the image allows, so the result is a wider shot rather than a smaller image.
    """
    side = int(round(max(face.w, face.h) * FACE_SIDE_FACTOR))
    side = max(1, min(max(side, min_side), W, H))
    cx = face.x + face.w / 2
    cy = face.y + face.h / 2 + side * (0.5 - FACE_CENTER_FROM_TOP)
    return _place(cx, cy, side, side, W, H)


def center_square(W: int, H: int, focus: tuple[float, float] | None = None) -> Box:
    """The largest square, centred on `focus` (pixels) or on the image centre."""
    side = min(W, H)
    cx, cy = focus if focus else (W / 2, H / 2)
    return _place(cx, cy, side, side, W, H)


def focal_point(rgb: np.ndarray) -> tuple[float, float]:
    """Where the interesting content is, as fractions (fx, fy) of width and height.

    A1111's focal-point idea without faces: edges (weight 0.5) and local entropy (0.15),
    measured on a grid of cells; the point is the weighted centre of the busiest cells.
    """
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
    h, w = gray.shape
    f = 256 / max(h, w)
    if f < 1:
        gray = cv2.resize(gray, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    h, w = gray.shape
    cell = 16
    gh, gw = max(1, h // cell), max(1, w // cell)
    g = cv2.resize(gray, (gw * cell, gh * cell), interpolation=cv2.INTER_AREA)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    edges = np.sqrt(gx * gx + gy * gy).reshape(gh, cell, gw, cell).mean(axis=(1, 3))
    # Entropy of 16 grey levels within each cell.
    levels = (g // 16).astype(np.int64).reshape(gh, cell, gw, cell).transpose(0, 2, 1, 3).reshape(gh * gw, -1)
    idx = np.arange(gh * gw)[:, None] * 16 + levels
    counts = np.bincount(idx.ravel(), minlength=gh * gw * 16).reshape(gh * gw, 16).astype(np.float32)
    p = counts / counts.sum(axis=1, keepdims=True)
    entropy = -(p * np.log2(np.where(p > 0, p, 1))).sum(axis=1).reshape(gh, gw)
    score = 0.5 * _norm(edges) + 0.15 * _norm(entropy)
    weight = score**2
    if weight.sum() <= 1e-9:
        return 0.5, 0.5
    ys, xs = np.mgrid[0:gh, 0:gw]
    fx = float(((xs + 0.5) * weight).sum() / weight.sum() / gw)
    fy = float(((ys + 0.5) * weight).sum() / weight.sum() / gh)
    return fx, fy


def _norm(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def make_buckets(size: int, step: int = BUCKET_STEP) -> list[tuple[int, int]]:
    """Bucket resolutions that keep about size*size pixels, sides multiples of `step`."""
    step = step if size >= 4 * step else max(8, size // 8 // 8 * 8)
    area = size * size
    lo, hi = max(step, size // 2 // step * step), size * 2
    buckets = {(max(step, size // step * step),) * 2}
    for w in range(lo, hi + 1, step):
        h = min(hi, area // w // step * step)
        if h >= lo:
            buckets.add((w, h))
            buckets.add((h, w))
    return sorted(buckets)


def nearest_bucket(w: int, h: int, size: int) -> tuple[int, int]:
    ar = math.log(w / h)
    return min(make_buckets(size), key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


def bucket_crop(W: int, H: int, size: int, upscale: bool,
                focus: tuple[float, float] | None = None) -> tuple[Box, tuple[int, int]]:
    """(box, output size) for bucket mode: the nearest-aspect bucket, cropped around `focus`.

    Like kohya's bucket_no_upscale, an image with fewer pixels than the bucket keeps its own
    size, trimmed to multiples of the bucket step, instead of being enlarged.
    """
    bw, bh = nearest_bucket(W, H, size)
    cx, cy = focus if focus else (W / 2, H / 2)
    if W * H < bw * bh and not upscale:
        step = BUCKET_STEP if min(W, H) >= BUCKET_STEP else 8
        ow, oh = max(step, W // step * step), max(step, H // step * step)
        ow, oh = min(ow, W), min(oh, H)
        return _place(cx, cy, ow, oh, W, H), (ow, oh)
    # The largest box of the bucket's aspect ratio inside the image.
    if W / H > bw / bh:
        box_h, box_w = H, max(1, round(H * bw / bh))
    else:
        box_w, box_h = W, max(1, round(W * bh / bw))
    return _place(cx, cy, box_w, box_h, W, H), (bw, bh)


def square_output(box: Box, size: int, upscale: bool) -> tuple[int, int]:
    side = box[2] - box[0]
    out = size if (side >= size or upscale) else side
    return out, out


def whole_output(W: int, H: int, size: int, upscale: bool) -> tuple[int, int]:
    """Output size for 'none': the whole image scaled to about size*size pixels (never up unless asked)."""
    f = math.sqrt(size * size / (W * H))
    if f >= 1 and not upscale:
        return W, H
    return max(1, round(W * f)), max(1, round(H * f))


def clamp_box(box: tuple[float, float, float, float], W: int, H: int, square: bool) -> Box:
    """A user-given box made valid: inside the image, at least 1 pixel, square when asked."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    x0, y0 = max(0.0, x0), max(0.0, y0)
    x1, y1 = min(float(W), x1), min(float(H), y1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ValueError(f"crop box {box} lies outside the {W}x{H} image")
    if square:
        side = int(round(min(x1 - x0, y1 - y0)))
        return _place((x0 + x1) / 2, (y0 + y1) / 2, side, side, W, H)
    return (int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1)))
