"""Fixtures of the speed tests: a tiny backbone, a small captioned dataset, a ready Trainer."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from lib_lora.config import TrainConfig
from lib_lora.training.run import Trainer


def _dataset(root: Path, n: int = 3, size: int = 64) -> Path:
    sub = root / "2_zhang"
    sub.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(n):
        Image.effect_noise((size, size), 40 + i).convert("RGB").save(sub / f"{i}.png")
        tags = ["zhang", "1girl", *rng.sample(["smile", "hat", "shirt", "earrings", "red hair"], 3)]
        (sub / f"{i}.txt").write_text(", ".join(tags), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def bb():
    """One tiny backbone for the module (the Trainer leaves it as it found it)."""
    from lib_lora.training.models import load_backbone

    return load_backbone("tiny", device="cpu")


@pytest.fixture
def speed_cfg() -> Callable[..., TrainConfig]:
    """cfg(tmp_path, **overrides): a 3-step tiny-model run on a 3-image dataset in tmp_path/data."""

    def make(tmp_path: Path, **kw) -> TrainConfig:
        data = tmp_path / "data"
        base = dict(
            name="speedtest", dataset=str(data if data.exists() else _dataset(data)), output_dir=str(tmp_path / "out"),
            run_dir=str(tmp_path / "run"), overwrite=True, resolution=64, optimizer="adamw", lr="1e-3", dim=4,
            alpha=2.0, log_every_n_steps=2, max_steps=3, cache_latents_to_disk=False,
        )  # fmt: skip
        base.update(kw)
        return TrainConfig(**base)

    return make


@pytest.fixture
def ready_trainer() -> Callable[[TrainConfig, object], Trainer]:
    """A Trainer set up to its first step (no TensorBoard), as the benches drive it."""

    def make(cfg: TrainConfig, backbone) -> Trainer:
        tr = Trainer(cfg, backbone)
        tr.state.started_at, tr.state.name = time.time(), cfg.name
        tr.load_all()
        tr.state.tb = None
        return tr

    return make
