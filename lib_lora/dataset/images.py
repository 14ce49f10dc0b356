"""Reading user images safely: header checks, EXIF orientation, colour modes, reduced decoding.

Every problem becomes a `BadImage` whose text is one sentence for the user; nothing here
writes, and the source file is only ever opened for reading.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

# Refuse before decoding: 150 MP is above any camera's normal output (a 200 MP phone mode is
# refused too) and keeps one worker's decode under ~1 GB.
MAX_PIXELS = 150_000_000
MIN_SIDE_SKIP = 64
MIN_SIDE_WARN = 256
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


class BadImage(Exception):
    """A file that cannot be used; str() is the one-line reason shown to the user."""


@dataclass
class Decoded:
    image: Image.Image  # RGB, or RGBA when the source has real transparency
    scale: float  # decoded size / full oriented size (1.0 = full resolution)
    notes: list[str]


@dataclass
class SourceInfo:
    path: Path
    format: str
    size: tuple[int, int]  # oriented (as the user sees it), full resolution
    orientation: int
    frames: int
    # The file's bytes when the caller had read them already (to hash them): decode() then
    # reads no file. None: decode() opens the path.
    data: bytes | None = field(default=None, repr=False)


def _megapixels(w: int, h: int) -> str:
    return f"{w}x{h} pixels ({w * h / 1e6:.0f} megapixels)"


def _open(path: Path, data: bytes | None = None) -> Image.Image:
    ext = path.suffix.lower()
    try:
        with warnings.catch_warnings():
            # We apply our own, lower size limit below; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data) if data is not None else path)
    except Image.DecompressionBombError:
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) // 1_000_000
        raise BadImage(f"refused: its header claims over {limit} megapixels, too large to load safely "
                       "(a damaged file or a decompression bomb).") from None
    except UnidentifiedImageError:
        raise BadImage(f"not an image (or a format we cannot read) despite its {ext or 'missing'} extension.") from None
    except OSError as err:
        raise BadImage(f"cannot be read ({err.strerror or err}).") from None


def inspect(path: Path, data: bytes | None = None) -> SourceInfo:
    """Header-only checks: format, size, orientation. Raises BadImage; never decodes pixels.

    `data`: the file's bytes, when the caller has read them (they are parsed instead of the
    file, and kept in the result for decode())."""
    img = _open(path, data)
    try:
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise BadImage(
                f"refused: {_megapixels(w, h)} is above the {MAX_PIXELS // 1_000_000}-megapixel limit; "
                "downscale it first."
            )
        orientation = _orientation(img)
        if orientation in _SWAPS_AXES:
            w, h = h, w
        return SourceInfo(path, img.format or "?", (w, h), orientation, getattr(img, "n_frames", 1), data)
    finally:
        img.close()


def _orientation(img: Image.Image) -> int:
    try:
        value = int(_header_exif(img).get(0x0112, 1))
    except Exception:  # a broken EXIF block must not lose the image
        return 1
    return value if 1 <= value <= 8 else 1


_PNG_METADATA = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")  # where Pillow looks for an orientation


def _header_exif(img: Image.Image) -> Image.Exif:
    """The EXIF Pillow would report, without decoding the pixels.

    Pillow's PNG getexif() decodes the whole image first, in case an EXIF or text chunk comes
    after the pixel data; that made every header check of a PNG a full decode. Such late
    chunks are rare: look for one by walking the chunk headers, and take Pillow's decoding
    way only when there is one. Otherwise the chunks read at open are all there is, and the
    base class reads them (the PNG override would decode)."""
    if img.format == "PNG" and "exif" not in img.info and not _png_late_metadata(img.fp):
        return Image.Image.getexif(img)
    return img.getexif()


def _png_late_metadata(fp: BinaryIO) -> bool:
    """Whether an EXIF or text chunk follows the PNG's pixel data. Reads the 8-byte chunk
    headers only, seeking over the data; a truncated file just ends the walk."""
    fp.seek(8)  # past the signature
    seen_pixels = False
    while True:
        head = fp.read(8)
        if len(head) < 8:
            return False
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IEND":
            return False
        if kind in (b"IDAT", b"fdAT"):
            seen_pixels = True
        elif seen_pixels and kind in _PNG_METADATA:
            return True
        fp.seek(length + 4, os.SEEK_CUR)  # the chunk's data and CRC


def decode(info: SourceInfo, min_scale: float = 1.0) -> Decoded:
    """Decode the image, oriented, as RGB/RGBA, at a scale of at least `min_scale` of full size.

    JPEGs are decoded at 1/2, 1/4 or 1/8 size when that is still large enough (libjpeg's DCT
    scaling): a 3000x2000 photo cropped to 512 never needs its full 6 megapixels.
    """
    img = _open(info.path, info.data)
    notes: list[str] = []
    try:
        if info.frames > 1:
            img.seek(0)
            notes.append(f"animated ({info.frames} frames): first frame used")
        if img.format == "JPEG" and min_scale < 1.0:
            sw, sh = img.size
            img.draft(img.mode, (max(1, math.ceil(sw * min_scale)), max(1, math.ceil(sh * min_scale))))
        try:
            img.load()
        except Image.DecompressionBombError as err:
            raise BadImage(f"refused: the image is too large to load safely ({err}).") from None
        except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... on bad data
            raise BadImage(f"corrupt or truncated file ({_short(err)}): re-save or re-export it.") from None
        oriented = img
        if info.orientation != 1:
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception:
                notes.append("unreadable EXIF orientation: used as stored")
        rgb, mode_note = to_rgb(oriented, img.info.get("icc_profile"))
        if mode_note:
            notes.append(mode_note)
        if rgb is img and getattr(img, "fp", None) is not None:
            rgb = img.copy()  # multi-frame files keep their file open; detach before closing
    finally:
        if "rgb" not in locals() or rgb is not img:
            img.close()
    scale = rgb.width / info.size[0]
    return Decoded(rgb, scale, notes)


def load_rgb(path: Path, data: bytes | None = None) -> Image.Image:
    """The image as a model should see it: upright (EXIF), RGB, transparency composited on white.

    Training and tagging both read images through this: a transparent cut-out must look the same
    to both, and a learned or tagged background should be neutral, never the black that hides in
    the RGB channels of transparent pixels. `data`: the file's bytes when the caller has them
    (then the file is not read again). Raises BadImage.
    """
    img = decode(inspect(Path(path), data)).image
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img).convert("RGB")
    return img


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:80]


def to_rgb(img: Image.Image, icc: bytes | None = None) -> tuple[Image.Image, str]:
    """Any Pillow mode to RGB, or RGBA when there is real transparency. Returns (image, note)."""
    mode = img.mode
    note = ""
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Pillow's own convert clips 16-bit values at 255 (an all-white image); scale instead.
        arr = np.asarray(img).astype(np.float32)
        hi = float(arr.max()) if arr.size else 0.0
        if mode == "F" and hi <= 1.0:
            arr = arr * 255.0
        elif hi > 255:
            arr = arr / 257.0 if hi <= 65535 else arr * (255.0 / hi)
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
        return img, f"{mode} (high bit depth) converted to 8-bit"
    if icc and mode in ("RGB", "RGBA", "CMYK"):
        img, converted = _to_srgb(img, icc)
        if converted:
            note = "colour profile converted to sRGB"
        mode = img.mode
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    elif mode not in ("RGB", "RGBA"):
        img = img.convert("RGB")
        note = note or f"{mode} converted to RGB"
    if img.mode == "RGBA" and img.getchannel("A").getextrema()[0] == 255:
        img = img.convert("RGB")  # an alpha channel that is opaque everywhere is no transparency
    return img, note


_SRGB = None


def _to_srgb(img: Image.Image, icc: bytes) -> tuple[Image.Image, bool]:
    global _SRGB
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in (ImageCms.getProfileDescription(src) or "").lower().replace(" ", ""):
            return img, False
        if _SRGB is None:
            _SRGB = ImageCms.createProfile("sRGB")
        out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
        return ImageCms.profileToProfile(img, src, _SRGB, outputMode=out_mode), True
    except Exception:  # a broken or exotic profile: keep the pixels as they are
        return img, False
