"""Taggers: one small protocol, two ONNX backends (DeepDanbooru and WD14).

A tagger returns, per image, every tag whose score reaches the tagger's `threshold` (a low
floor: the caption step applies the user's thresholds, and keeps the rest as raw scores).
The WebUI's built-in Deepbooru implements the same protocol in `lib_lora/hosts/`.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from lib_lora.config import TagConfig
from lib_lora.errors import ModelLoadError, UserError

DEEPDANBOORU_HOME = Path.home() / ".deepdanbooru_onnx"
DEEPDANBOORU_FILES = ("deepdanbooru.onnx", "tags.txt")
WD14_FILES = ("model.onnx", "selected_tags.csv")
WD14_CACHE = Path(os.environ.get("FAST_LORA_TAGGER_HOME", Path.home() / ".cache" / "fast_lora" / "taggers"))
WD14_DEFAULT_REPO = "SmilingWolf/wd-swinv2-tagger-v3"

# WD14 selected_tags.csv categories.
CATEGORY_NAMES = {0: "general", 1: "artist", 3: "copyright", 4: "character", 5: "meta", 9: "rating"}


@runtime_checkable
class Tagger(Protocol):
    name: str

    def tag_images(self, images: list[Image.Image]) -> list[dict[str, float]]:
        """For each image, {tag: score} for every tag at or above the tagger's threshold."""


def tag_category(tagger: Any, tag: str) -> str:
    """'general', 'character', 'rating', ... for a tag; taggers without categories say 'general'."""
    if tag.startswith("rating:"):
        return "rating"
    category = getattr(tagger, "category", None)
    return category(tag) if callable(category) else "general"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("FAST_LORA_OFFLINE", "") not in ("", "0")


def onnx_providers(device: str = "auto") -> list[str]:
    """onnxruntime providers: the GPU one when it is available and not refused."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise UserError("device = cuda, but this onnxruntime has no CUDA provider; use device auto or cpu.")
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def map_threads(fn: Any, items: list[Any]) -> list[Any]:
    """fn over items on a few threads: Pillow's decode/resize and numpy release the GIL."""
    workers = min(4, os.cpu_count() or 1, len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _check_threshold(threshold: float) -> float:
    if not 0 <= float(threshold) <= 1:
        raise UserError(f"threshold = {threshold}: give a number between 0 and 1.")
    return float(threshold)


# ------------------------------------------------------------------------------------ DeepDanbooru


def _dd_missing(model: Path | None, tags: Path | None) -> ModelLoadError:
    return ModelLoadError(
        "The DeepDanbooru model is missing: put deepdanbooru.onnx and tags.txt "
        f"(from huggingface.co/chinoll/deepdanbooru) into {DEEPDANBOORU_HOME}, "
        "or give their paths as --model and --tags-file."
        + (f" Not found: {', '.join(str(p) for p in (model, tags) if p is not None and not p.is_file())}." if model or tags else "")
    )


def resolve_deepdanbooru(model_path: str | Path | None, tags_path: str | Path | None, allow_download: bool) -> tuple[Path, Path]:
    """The model and tags files: the user's paths, else deepdanbooru-onnx's cache folder, else a download."""
    model = Path(model_path).expanduser() if model_path else None
    tags = Path(tags_path).expanduser() if tags_path else None
    if model is not None and model.is_dir():
        tags = tags or model / DEEPDANBOORU_FILES[1]
        model = model / DEEPDANBOORU_FILES[0]
    if model is not None:
        tags = tags or model.with_name(DEEPDANBOORU_FILES[1])
        if not (model.is_file() and tags.is_file()):
            raise _dd_missing(model, tags)
        return model, tags
    cached = DEEPDANBOORU_HOME / DEEPDANBOORU_FILES[0], tags or DEEPDANBOORU_HOME / DEEPDANBOORU_FILES[1]
    if cached[0].is_file() and cached[1].is_file():
        return cached
    if not allow_download or _offline():
        raise _dd_missing(None, None)
    from deepdanbooru_onnx import deepdanbooru_onnx as ddo

    try:  # the library's own downloader (644 MB, md5-checked)
        model_file, tags_file = ddo.download_model()
    except Exception as err:  # noqa: BLE001 - any network failure ends in the same advice
        raise _dd_missing(None, None) from err
    return Path(model_file), Path(tags_file)


class DeepDanbooruTagger:
    """DeepDanbooru through `deepdanbooru-onnx`: RGB 512x512 in [0, 1], NHWC, sigmoid scores."""

    name = "deepdanbooru"

    def __init__(self, model_path: Path, tags_path: Path, threshold: float = 0.05, device: str = "auto",
                 batch_size: int = 4) -> None:
        from deepdanbooru_onnx import DeepDanbooru

        mode = "gpu" if onnx_providers(device)[0] == "CUDAExecutionProvider" else "cpu"
        try:
            self.model = DeepDanbooru(mode=mode, model_path=str(model_path), tags_path=str(tags_path),
                                      threshold=_check_threshold(threshold), batch_size=batch_size)
        except Exception as err:
            raise ModelLoadError(f"Could not load the DeepDanbooru model {model_path}: {err}. "
                                 "Check that it is the deepdanbooru.onnx file, complete.") from err
        self.threshold = float(threshold)
        self.batch_size = batch_size
        n_out = self.model.session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.model.tags):
            raise ModelLoadError(f"{tags_path} lists {len(self.model.tags)} tags but the model scores {n_out}; "
                                 "use the tags.txt that came with the model.")

    def tag_images(self, images: list[Image.Image]) -> list[dict[str, float]]:
        from deepdanbooru_onnx import process_image

        out: list[dict[str, float]] = []
        for start in range(0, len(images), self.batch_size):
            batch = np.concatenate(map_threads(process_image, images[start:start + self.batch_size]))
            scores = self.model.inference(batch)
            out.extend(_above(self.model.tags, row, self.threshold) for row in scores)
        return out


def _above(tags: list[str], row: np.ndarray, threshold: float) -> dict[str, float]:
    idx = np.flatnonzero(row >= threshold)
    return {tags[i]: float(row[i]) for i in idx}


# ------------------------------------------------------------------------------------------- WD14


@dataclass
class WD14Labels:
    names: list[str]
    categories: list[int]
    by_name: dict[str, int] = field(default_factory=dict)


def read_selected_tags(path: Path) -> WD14Labels:
    """selected_tags.csv: tag_id,name,category,count (category 9 rating, 0 general, 4 character)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        names = [r["name"] for r in rows]
        cats = [int(r["category"]) for r in rows]
    except (OSError, KeyError, ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path} is not a WD14 selected_tags.csv (tag_id,name,category,count): {err}.") from err
    if not names:
        raise ModelLoadError(f"{path} lists no tags; use the selected_tags.csv that came with the model.")
    labels = WD14Labels(names, cats)
    labels.by_name = {n: c for n, c in zip(names, cats, strict=True)}
    return labels


def _wd14_missing(where: str) -> ModelLoadError:
    return ModelLoadError(
        f"The WD14 tagger is missing: put model.onnx and selected_tags.csv (from a SmilingWolf/wd-*-tagger "
        f"repository) into {where}, or give the folder or the .onnx file as --model."
    )


def resolve_wd14(model_path: str | Path | None, tags_path: str | Path | None, allow_download: bool) -> tuple[Path, Path]:
    """model.onnx and selected_tags.csv from a file, a folder, our cache, or a hub repo id."""
    repo = WD14_DEFAULT_REPO
    if model_path:
        p = Path(model_path).expanduser()
        if p.is_dir():
            p = p / WD14_FILES[0]
        if p.exists() or p.suffix == ".onnx" or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(model_path)):
            tags = Path(tags_path).expanduser() if tags_path else p.with_name(WD14_FILES[1])
            if not (p.is_file() and tags.is_file()):
                raise _wd14_missing(str(p.parent))
            return p, tags
        repo = str(model_path)  # owner/name: a hub repository
    folder = WD14_CACHE / repo.replace("/", "--")
    model, tags = folder / WD14_FILES[0], Path(tags_path) if tags_path else folder / WD14_FILES[1]
    if model.is_file() and tags.is_file():
        return model, tags
    if not allow_download or _offline():
        raise _wd14_missing(str(folder))
    try:
        from huggingface_hub import hf_hub_download

        for name in WD14_FILES:
            hf_hub_download(repo, name, local_dir=str(folder))
    except Exception as err:  # noqa: BLE001
        raise _wd14_missing(str(folder)) from err
    return model, tags


class WD14Tagger:
    """SmilingWolf's WD14 taggers (v2 and v3): BGR 0-255, NHWC, padded square on white."""

    name = "wd14"

    def __init__(self, model_path: Path, tags_path: Path, threshold: float = 0.05, device: str = "auto",
                 batch_size: int = 4) -> None:
        import onnxruntime as ort

        self.labels = read_selected_tags(Path(tags_path))
        try:
            self.session = ort.InferenceSession(str(model_path), providers=onnx_providers(device))
        except Exception as err:
            raise ModelLoadError(f"Could not load the WD14 model {model_path}: {err}. "
                                 "Check that it is a complete model.onnx.") from err
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.size = int(inp.shape[1]) if isinstance(inp.shape[1], int) else 448
        # v2 exports fix the batch dimension at 1; v3 leave it free.
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        n_out = self.session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.labels.names):
            raise ModelLoadError(f"{tags_path} lists {len(self.labels.names)} tags but the model scores {n_out}; "
                                 "use the selected_tags.csv that came with the model.")
        self.threshold = _check_threshold(threshold)
        self.batch_size = self.fixed_batch or batch_size

    def category(self, tag: str) -> str:
        code = self.labels.by_name.get(tag, 0)
        return CATEGORY_NAMES.get(code, "general")

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """[size, size, 3] float32 BGR 0-255: transparency on white, padded square on white, resized."""
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            canvas.alpha_composite(rgba)
            image = canvas
        image = image.convert("RGB")
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        if side != self.size:
            square = square.resize((self.size, self.size), Image.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1]

    def tag_images(self, images: list[Image.Image]) -> list[dict[str, float]]:
        out: list[dict[str, float]] = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack(map_threads(self.preprocess, images[start:start + self.batch_size]))
            scores = self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0]
            out.extend(_above(self.labels.names, row, self.threshold) for row in scores)
        return out


def load_tagger(kind: str, model_path: str | Path | None = None, tags_path: str | Path | None = None,
                **opts: Any) -> Tagger:
    """A ready tagger. opts: threshold (score floor, default 0.05), device, batch_size, allow_download."""
    allow_download = bool(opts.pop("allow_download", True))
    opts.setdefault("threshold", 0.05)
    if kind == "deepdanbooru":
        model, tags = resolve_deepdanbooru(model_path, tags_path, allow_download)
        return DeepDanbooruTagger(model, tags, **opts)
    if kind == "wd14":
        model, tags = resolve_wd14(model_path, tags_path, allow_download)
        return WD14Tagger(model, tags, **opts)
    if kind == "webui":
        raise UserError("The WebUI's Deepbooru tagger is only available inside the WebUI; use deepdanbooru or wd14.")
    raise UserError(f"Unknown tagger {kind!r}; choose deepdanbooru or wd14.")


def tagger_for(cfg: TagConfig) -> Tagger:
    """The tagger a config asks for, reporting scores down to `cfg.tagger_floor()`.

    The CLI and the Tag tab both load taggers here, so one config gives the same captions in both.
    """
    return load_tagger(
        cfg.tagger,
        cfg.model or None,
        cfg.tags_file or None,
        threshold=cfg.tagger_floor(),
        device=cfg.device,
        batch_size=cfg.batch_size,
        allow_download=cfg.allow_download,
    )
