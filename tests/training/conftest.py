"""Fixtures for the training tests: one tiny backbone per session, small drawn datasets."""

from pathlib import Path

import pytest
from lora_helpers import randomize_lora


@pytest.fixture(scope="session")
def tiny_backbone():
    """The tiny built-in model, loaded through the single-file checkpoint path (shared, read-only)."""
    from lib_lora.training.models import load_backbone

    return load_backbone("tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_checkpoint():
    from lib_lora.training.tiny_model import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


@pytest.fixture
def randomize():
    return randomize_lora


@pytest.fixture(scope="session")
def drawn_dataset(tmp_path_factory) -> Path:
    """4 drawn 64x64 images of the demo character, captioned, in a 2_<name> folder."""
    from lib_lora.demo import make_dataset

    return make_dataset(tmp_path_factory.mktemp("drawn"), count=4, size=64, repeats=2)
