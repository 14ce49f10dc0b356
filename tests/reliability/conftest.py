import sys
from pathlib import Path

# pytest runs with --import-mode=importlib: make the area's helper module importable.
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def bb():
    """The tiny built-in model, loaded once for the in-process runs (they never change its weights)."""
    from lib_lora.training.models import load_backbone

    return load_backbone("tiny")
