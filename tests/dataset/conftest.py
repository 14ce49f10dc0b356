"""Fixtures for the prepare step: real face photos that ship offline, the tiny ONNX model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY_BG_MODEL = FIXTURES / "tiny_bg_model.onnx"


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="session")
def grace_hopper() -> Image.Image:
    import matplotlib.cbook as cbook

    return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _pattern(seed: int, w: int = 800, h: int = 600) -> np.ndarray:
    """A distinct, structured RGB picture per seed (so no two count as near duplicates)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


@pytest.fixture(scope="session")
def tree_hashes():
    """sha256 of every file under a folder, by relative path."""
    return _tree_hashes


@pytest.fixture(scope="session")
def pattern():
    """pattern(seed, w=800, h=600): a distinct picture per seed."""
    return _pattern
