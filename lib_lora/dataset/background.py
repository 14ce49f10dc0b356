"""Background removal through rembg's own sessions, and compositing onto a plain colour.

Model files live in rembg's folder ($U2NET_HOME, default ~/.u2net) or a folder/file the user
gives. A missing file is downloaded by rembg's own code when allowed; when that fails, one
message names the file and where to put it.
"""

from __future__ import annotations

import colorsys
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor

from lib_lora.errors import ModelLoadError, UserError

# rembg's file names for the models we offer, as published on its release page
# (the local name is always <model>.onnx).
RELEASE_FILES = {
    "u2net": "u2net.onnx",
    "u2netp": "u2netp.onnx",
    "isnet-anime": "isnet-anime.onnx",
    "birefnet-portrait": "BiRefNet-portrait-epoch_150.onnx",
}
RELEASES_PAGE = "https://github.com/danielgatis/rembg/releases/tag/v0.0.0"


@dataclass(frozen=True)
class BgModel:
    spec: str  # what the user asked for: a model name or a .onnx path
    session: str  # the rembg session class name that runs it
    path: str  # the model file

    def identity(self) -> str:
        """Changes when the model file changes (for re-run decisions), without hashing 170 MB."""
        st = os.stat(self.path)
        return f"{self.session}:{Path(self.path).name}:{st.st_size}:{int(st.st_mtime)}"


def rembg_home() -> Path:
    from rembg.sessions.base import BaseSession

    return Path(BaseSession.u2net_home())


def _session_class(name: str):
    from rembg.sessions import sessions_class

    for cls in sessions_class:
        if cls.name() == name:
            return cls
    raise UserError(f"This rembg version has no background model named {name!r}; update rembg or pick another.")


def resolve_model(spec: str, model_dir: str = "", download: bool = True) -> BgModel | None:
    """Find (or fetch) the model file for `spec`; None when spec is 'none'."""
    if not spec or spec == "none":
        return None
    if spec.lower().endswith(".onnx"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"The background model file {path} does not exist; check the path given as --remove-bg.")
        return BgModel(spec, "u2net_custom", str(path.resolve()))
    if spec not in RELEASE_FILES:
        raise UserError(f"Unknown background model {spec!r}: use one of {', '.join(RELEASE_FILES)} or a .onnx file.")
    home = Path(model_dir).expanduser() if model_dir else rembg_home()
    path = home / f"{spec}.onnx"
    if not path.is_file():
        reason = "downloads are off"
        if download:
            try:
                cls = _session_class(spec)
                # rembg's own downloader, pointed at our folder.
                local = type(cls.__name__, (cls,), {"u2net_home": classmethod(lambda c, *a, **k: str(home))})
                home.mkdir(parents=True, exist_ok=True)
                local.download_models()
            except Exception as err:  # no network, a proxy, a checksum mismatch...
                reason = f"download failed: {str(err).splitlines()[0][:120] if str(err) else type(err).__name__}"
        if not path.is_file():
            raise ModelLoadError(
                f"The background model '{spec}' is missing and could not be fetched ({reason}): download "
                f"{RELEASE_FILES[spec]} from {RELEASES_PAGE} and save it as {path}, or give the path of a .onnx file "
                "as --remove-bg."
            )
    return BgModel(spec, spec, str(path))


@functools.lru_cache(maxsize=2)
def load_session(model: BgModel, threads: int = 0):
    """A rembg session running `model.path` with rembg's own pre- and post-processing."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        if model.session == "u2net_custom":
            cls = _session_class("u2net_custom")
            return cls("u2net_custom", opts, model_path=model.path, providers=["CPUExecutionProvider"])
        cls = _session_class(model.session)
        # The file is already here: load it directly instead of letting rembg re-check or re-fetch it.
        local = type(cls.__name__, (cls,), {"download_models": classmethod(lambda c, *a, **k: model.path)})
        return local(model.session, opts, providers=["CPUExecutionProvider"])
    except UserError:
        raise
    except Exception as err:
        raise ModelLoadError(
            f"The background model {model.path} could not be loaded ({str(err).splitlines()[0][:120]}); "
            "it may be incomplete: delete it and download it again."
        ) from None


def predict_mask(session, rgb: Image.Image) -> Image.Image:
    """The foreground mask (L, same size as `rgb`) from rembg."""
    from rembg import remove

    mask = remove(rgb, session=session, only_mask=True)
    if mask.size != rgb.size:
        mask = mask.resize(rgb.size, Image.Resampling.BILINEAR)
    return mask.convert("L")


def parse_color(text: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise UserError(f"bg_color = {text!r} is not a colour: use a name such as white or grey, or #rrggbb.") from None


def composite(rgb: Image.Image, mask: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """`rgb` over a plain `color`, weighted by `mask` (255 = foreground)."""
    a = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    fg = np.asarray(rgb.convert("RGB"), dtype=np.float32)
    bg = np.asarray(color, dtype=np.float32)
    out = fg * a + bg * (1.0 - a)
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


# Danbooru's words for plain backgrounds (what DeepDanbooru/WD14 output and users prompt with);
# tagging/data/backgrounds.txt lists each "<word> background" so the tagger's own guess is replaced.
_DANBOORU_COLOURS = "white grey black blue red green yellow pink purple orange brown".split()
# Manifest values that mean the cut-out was kept transparent (no colour composited).
_TRANSPARENT = {"transparent", "none"}


def colour_word(rgb: tuple[int, int, int]) -> str:
    """The Danbooru colour word a viewer would use for `rgb`, e.g. (0, 0, 128) -> 'blue'.

    Decided by hue, not by the distance to one sample per word: a single sample cannot place
    navy (blue, but dark) or light pink (pink, but with a red hue) where people do.
    """
    r, g, b = (c / 255 for c in rgb[:3])
    hi, lo = max(r, g, b), min(r, g, b)
    if hi < 0.25:
        return "black"  # too dark for any hue to show
    if hi - lo < 0.15:  # hardly any hue: only the lightness matters
        return "white" if lo > 0.85 else "grey"
    hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
    light, sat = (hi + lo) / 2, (hi - lo) / hi
    if hue < 15 or hue >= 315:
        return "pink" if light > 0.75 or 315 <= hue < 345 else "red"
    if hue < 70:
        # Dark oranges and yellows, and greyish oranges, are what people call brown (sienna, olive, tan).
        if hi < 0.65 or (hue < 45 and sat < 0.5 and light < 0.75):
            return "brown"
        return "orange" if hue < 45 else "yellow"
    if hue < 175:
        return "green"
    return "blue" if hue < 260 else "purple"


def background_tags(color: str | Sequence[int] | None) -> list[str]:
    """Tags for a background replaced by `color`, e.g. '#000' -> ['simple background', 'black background'].

    `color` is what prepare's bg_color accepts (a name, #rgb, #rrggbb, rgb(...), hsl(...)), an
    [r, g, b] list, or 'transparent'/'none'/None for a cut-out left transparent.
    """
    if color is None or (isinstance(color, str) and color.strip().lower() in _TRANSPARENT):
        return ["simple background", "transparent background"]
    if isinstance(color, str):
        word = color.strip().lower().replace("gray", "grey")
        if word not in _DANBOORU_COLOURS:  # the words themselves win: CSS 'brown' is a dark red
            try:
                word = colour_word(parse_color(color))
            except UserError:
                return ["simple background"]  # a colour nobody can parse: say no more than we know
    else:
        try:
            word = colour_word(tuple(int(v) for v in color[:3]))
        except (TypeError, ValueError):
            return ["simple background"]
    return ["simple background", f"{word} background"]
