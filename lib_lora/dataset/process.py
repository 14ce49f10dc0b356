"""One image through the pipeline: decode, find the crop, resize, cut out, write.

This runs inside worker processes, so it takes and returns small picklable objects and
never raises for a bad image: the record says what happened.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lib_lora.atomic import atomic_write_bytes
from lib_lora.dataset import background, crop, faces, images
from lib_lora.dataset.hashing import bytes_sha256, phash
from lib_lora.dataset.records import Box, ImageRecord
from lib_lora.errors import UserError

ANALYSIS_SIDE = 640  # long side of the copy used for face detection, focal point and pHash
PNG_COMPRESS_LEVEL = 1  # Pillow's default (6) takes ~6x the time for files ~15% smaller
TWO_PASS_PIXELS = 24_000_000  # above this, face mode finds the face on a small decode first


@dataclass(frozen=True)
class Settings:
    size: int
    crop: str
    upscale: bool
    keep_rgba: bool
    bg_rgb: tuple[int, int, int]
    bg_model: background.BgModel | None
    yunet: str | None
    threads: int = 0  # onnxruntime threads per worker (0 = its default)


@dataclass(frozen=True)
class Task:
    source: str
    output: str
    mask_output: str
    settings: Settings
    crop_override: Box | None = None


class FatalError(Exception):
    """A problem that stops the whole run (the background model cannot load), not one image."""


def init_worker(threads: int) -> None:
    """Pool initializer: one OpenCV thread per process, the cores are shared by processes."""
    import cv2

    cv2.setNumThreads(1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, threads)))


def process(task: Task) -> ImageRecord:
    """Run one image; a bad image gives a 'skipped' record, a model failure raises FatalError."""
    rec = ImageRecord(source=Path(task.source))
    cpu0 = time.process_time()
    try:
        _process(task, rec)
    except images.BadImage as err:
        rec.status, rec.message, rec.output = "skipped", str(err), None
    except UserError as err:
        raise FatalError(str(err)) from None
    except MemoryError:
        rec.status, rec.message, rec.output = "skipped", "not enough memory to decode this image.", None
    except Exception as err:  # an unexpected failure must cost one image, not the run
        rec.status, rec.output = "skipped", None
        rec.message = f"could not be processed ({type(err).__name__}: {str(err)[:100]})."
    rec.cpu_seconds = round(time.process_time() - cpu0, 4)
    return rec


def _process(task: Task, rec: ImageRecord) -> None:
    s = task.settings
    info = images.inspect(Path(task.source))
    W, H = info.size
    rec.source_size = (W, H)
    short = min(W, H)
    if short < images.MIN_SIDE_SKIP:
        raise images.BadImage(f"too small ({W}x{H}); images need at least {images.MIN_SIDE_SKIP} pixels on the short side.")
    warnings: list[str] = []
    if short < images.MIN_SIDE_WARN:
        warnings.append(f"small ({W}x{H}): details will be soft; {images.MIN_SIDE_WARN}+ pixels is better")

    # Decode once, at the smallest scale that still gives the output full detail (JPEGs decode
    # at 1/2..1/8 size directly). Entropy decoding dominates a JPEG's cost whatever the scale,
    # so a face crop, whose size is unknown before detection, decodes at full size in one go;
    # only very large images take a small first pass for detection.
    dec = images.decode(info, _planned_scale(task, W, H))
    rec.notes = list(dec.notes)
    k = max(1, max(dec.image.size) // ANALYSIS_SIDE)
    ana = dec.image.reduce(k) if k > 1 else dec.image  # for detection, focal point and pHash
    ana_rgb = np.asarray(ana.convert("RGB"))
    rec.phash = phash(np.asarray(ana.convert("L")))
    fx, fy = ana.width / W, ana.height / H

    box, out_size = _choose_crop(task, rec, ana_rgb, fx, fy, W, H, warnings)

    need = min(1.0, max(out_size[0] / (box[2] - box[0]), out_size[1] / (box[3] - box[1])))
    full = dec if dec.scale >= need - 1e-6 else images.decode(info, need)
    sx, sy = full.image.width / W, full.image.height / H
    src_box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    out = full.image.resize(out_size, Image.Resampling.LANCZOS, box=src_box, reducing_gap=3.0)

    if out_size[0] < s.size and not s.upscale and s.crop in ("face", "center"):
        warnings.append(f"kept at {out_size[0]}x{out_size[1]}, not upscaled to {s.size} (turn on --upscale to enlarge it)")

    # Transparency: the source's own alpha, else the background model's mask.
    mask = None
    if out.mode == "RGBA":
        mask = out.getchannel("A")
        rec.background_model = "source alpha"
    elif s.bg_model is not None:
        session = background.load_session(s.bg_model, s.threads)
        mask = background.predict_mask(session, out)
        rec.background_model = s.bg_model.spec
    if mask is not None:
        rgb = background.composite(out, mask, s.bg_rgb)
        rec.background_removed = True
        if s.keep_rgba:
            rgba = rgb.copy()
            rgba.putalpha(mask)
            _save_png(mask, Path(task.mask_output))
            rec.mask = Path(task.mask_output)
            out = rgba
        else:
            out = rgb
    elif out.mode != "RGB":
        out = out.convert("RGB")

    rec.output_sha256 = _save_png(out, Path(task.output))
    rec.output = Path(task.output)
    rec.crop_box = box
    rec.output_size = out.size
    if warnings:
        rec.status = "warning"
    rec.message = "; ".join(warnings + [n for n in rec.notes if n.startswith("animated")])


def _choose_crop(task: Task, rec: ImageRecord, ana_rgb: np.ndarray, fx: float, fy: float, W: int, H: int,
                 warnings: list[str]) -> tuple[Box, tuple[int, int]]:
    s = task.settings
    mode = s.crop
    if task.crop_override is not None:
        rec.crop_mode = "manual"
        return _override_crop(task, W, H)
    if mode == "none":
        rec.crop_mode = "none"
        return (0, 0, W, H), crop.whole_output(W, H, s.size, s.upscale)
    if mode == "center":
        rec.crop_mode = "center"
        box = crop.center_square(W, H)
        return box, crop.square_output(box, s.size, s.upscale)
    found = faces.detect_faces(ana_rgb, s.yunet)
    focus = None
    if found:
        face = found[0].scaled(1 / fx, 1 / fy)
        rec.face_box = (int(face.x), int(face.y), int(round(face.x + face.w)), int(round(face.y + face.h)))
        focus = (face.x + face.w / 2, face.y + face.h / 2)
    if mode == "bucket":
        rec.crop_mode = "bucket"
        if focus is None:
            px, py = crop.focal_point(ana_rgb)
            focus = (px * W, py * H)
        return crop.bucket_crop(W, H, s.size, s.upscale, focus)
    # face mode
    if found:
        rec.crop_mode = "face"
        box = crop.face_square(face, W, H, 0 if s.upscale else s.size)
    else:
        rec.crop_mode = "focal"
        px, py = crop.focal_point(ana_rgb)
        box = crop.center_square(W, H, (px * W, py * H))
        warnings.append("no face found: cropped around the busiest area instead")
    return box, crop.square_output(box, s.size, s.upscale)


def _override_crop(task: Task, W: int, H: int) -> tuple[Box, tuple[int, int]]:
    s = task.settings
    try:
        box = crop.clamp_box(task.crop_override, W, H, square=s.crop in ("face", "center"))
    except ValueError as err:
        raise images.BadImage(str(err)) from None
    bw, bh = box[2] - box[0], box[3] - box[1]
    if s.crop == "bucket":  # fit the user's box to its nearest bucket's aspect, inside the box
        sub, out = crop.bucket_crop(bw, bh, s.size, s.upscale)
        return (box[0] + sub[0], box[1] + sub[1], box[0] + sub[2], box[1] + sub[3]), out
    if s.crop == "none":
        return box, crop.whole_output(bw, bh, s.size, s.upscale)
    return box, crop.square_output(box, s.size, s.upscale)


def _planned_scale(task: Task, W: int, H: int) -> float:
    """The decode scale (1 = full size) known before looking at the pixels."""
    s = task.settings
    if task.crop_override is None and s.crop == "face":
        return min(1.0, ANALYSIS_SIDE / max(W, H)) if W * H > TWO_PASS_PIXELS else 1.0
    if task.crop_override is not None:
        box, out = _override_crop(task, W, H)
    elif s.crop == "center":
        box = crop.center_square(W, H)
        out = crop.square_output(box, s.size, s.upscale)
    elif s.crop == "none":
        box, out = (0, 0, W, H), crop.whole_output(W, H, s.size, s.upscale)
    else:  # bucket: the box's size does not depend on where it goes
        box, out = crop.bucket_crop(W, H, s.size, s.upscale)
    return min(1.0, max(out[0] / (box[2] - box[0]), out[1] / (box[3] - box[1])))


def _save_png(img: Image.Image, path: Path) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return bytes_sha256(data)
