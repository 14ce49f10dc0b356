"""Shared test set-up. Area-specific fixtures live in tests/<area>/conftest.py."""

import os
import sys
from pathlib import Path

import pytest

# pytest runs with --import-mode=importlib: the helper modules shared by several areas (e.g.
# ldm_shapes) sit in tests/ itself.
sys.path.insert(0, str(Path(__file__).parent))

# No test may reach a model hub: everything is built in the test or committed as a fixture.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------
# Counting work (never timing it): which files a step opens, which images it decodes.

_OPEN_RECORDERS: list[list[str]] = []
_AUDIT_HOOKED = False


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPEN_RECORDERS and isinstance(args[0], (str, bytes, os.PathLike)):
        for rec in _OPEN_RECORDERS:
            rec.append(os.fsdecode(args[0]))


@pytest.fixture
def file_opens():
    """A list that records the path of every file opened during the test, however it is
    opened (open(), Path.read_bytes(), Pillow): Python's audit hook sees them all."""
    global _AUDIT_HOOKED
    if not _AUDIT_HOOKED:  # an audit hook cannot be removed: one per process, idle between tests
        sys.addaudithook(_audit)
        _AUDIT_HOOKED = True
    rec: list[str] = []
    _OPEN_RECORDERS.append(rec)
    yield rec
    _OPEN_RECORDERS.remove(rec)


@pytest.fixture
def pixel_decodes(monkeypatch):
    """A list that records every image whose pixels Pillow decodes during the test (its file
    name, '' when opened from bytes). Pillow's load() of an image already decoded is free and
    not counted. The wrapper calls Pillow's own load: what is decoded does not change."""
    from PIL import ImageFile

    seen: list[str] = []
    real = ImageFile.ImageFile.load

    def load(self):
        if self.tile:
            seen.append(getattr(self, "filename", "") or "")
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return seen


@pytest.fixture
def path_calls(monkeypatch):
    """`path_calls(module, "function")` -> a list that records the file name of the path each
    call of `module.function(path, ...)` is given, in order; the real function runs."""
    from pathlib import Path

    def record(module, name: str) -> list[str]:
        names: list[str] = []
        real = getattr(module, name)

        def counting(path, *args, **kwargs):
            names.append(Path(path).name)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(module, name, counting)
        return names

    return record


# ---------------------------------------------------------------------------------------------
# Tolerances from the computation


def _float32_rounding(*models) -> float:
    """Relative error a float32 forward and backward pass through `models` can carry when its
    sums are computed in another order (other kernels, batch sizes or module implementations):
    a dot product of length K rounds with a relative error of about sqrt(K) * u (u = 2^-24,
    errors of random sign), and the errors of the layers add up, forward and backward."""
    import torch

    layers = [m for model in models for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    fan_in = max(m.weight[0].numel() for m in layers)
    return 2 * len(layers) * fan_in**0.5 * 2.0**-24


@pytest.fixture
def float32_rounding():
    """`_float32_rounding` (the tiny model's U-Net and text encoder: 353 layers, K <= 1152: 1.4e-3)."""
    return _float32_rounding


@pytest.fixture
def one_thread():
    """For byte-exact comparisons of two training runs: the claim is about our code, not torch's CPU kernels: with several
    threads some of them split a reduction by how the work was scheduled, so two runs of the same
    steps can differ in the last bit on some CPUs. One thread makes each step's arithmetic fixed."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
