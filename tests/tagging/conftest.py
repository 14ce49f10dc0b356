"""Fixtures for the tagging tests: the committed tiny tagger models and small image folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TAGGERS = FIXTURES / "taggers"


@pytest.fixture
def dd_dir() -> Path:
    return TAGGERS / "deepdanbooru"


@pytest.fixture
def make_images(tmp_path: Path):
    """make_images({'a.png': (r, g, b), ...}, folder='30_Zhang') -> the image folder."""

    def make(colours: dict[str, tuple[int, int, int]], folder: str = "30_Zhang", size=(64, 64)) -> Path:
        d = tmp_path / "train" / folder
        d.mkdir(parents=True, exist_ok=True)
        for name, rgb in colours.items():
            Image.new("RGB", size, rgb).save(d / name)
        return d

    return make
