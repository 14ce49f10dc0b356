"""Fixtures for the UI tests: a small generated photo folder and the tiny tagger fixture."""

from __future__ import annotations

import sys
from pathlib import Path

# pytest runs with --import-mode=importlib: make the area's helper module importable.
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "ui"


def make_photos(folder: Path, n_extra: int = 4) -> Path:
    """A real face photo (scikit-image's astronaut), a few generated scenes, one broken file."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.astronaut()).save(folder / "astronaut.jpg", quality=92)
    rng = np.random.default_rng(0)
    for i in range(n_extra):
        w, h = (320, 400) if i % 2 else (400, 300)
        img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(40, 220, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            d.ellipse([x0, y0, x0 + 40 + int(rng.integers(0, 80)), y0 + 40 + int(rng.integers(0, 80))],
                      fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        img.save(folder / f"scene_{i}.png")
    (folder / "broken.jpg").write_bytes(b"this is not an image")
    return folder


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    return make_photos(tmp_path / "photos")


@pytest.fixture()
def tagger_files() -> tuple[Path, Path]:
    """The tagging branch's tiny DeepDanbooru-shaped ONNX model and its tags list."""
    base = REPO / "tests" / "fixtures" / "taggers" / "deepdanbooru"
    model, tags = base / "deepdanbooru.onnx", base / "tags.txt"
    if not (model.is_file() and tags.is_file()):
        pytest.skip(f"tagger fixture missing: {model}")
    return model, tags


@pytest.fixture()
def bg_model() -> Path | None:
    """The dataset branch's tiny background-removal ONNX model, when present."""
    path = REPO / "tests" / "fixtures" / "tiny_bg_model.onnx"
    return path if path.is_file() else None


@pytest.fixture()
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
