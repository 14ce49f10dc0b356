"""What the WebUI host tests (A1111 and Forge) train on: a three-image dataset and a tiny config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from PIL import Image

from lib_lora.config import TrainConfig


def make_dataset(root: Path) -> Path:
    """Three 64 px images with captions (one with prompt emphasis, never parsed), repeat folder 3_sks."""
    folder = root / "data" / "3_sks"
    folder.mkdir(parents=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for i, c in enumerate(colours):
        img = Image.new("RGB", (64, 64), c)
        for x in range(0, 64, 8):
            img.putpixel((x, x), (255, 255, 255))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"sks, 1girl, (smile:1.2), tag{i}\n", encoding="utf-8")
    return root / "data"


def tiny_cfg(dataset, **kw) -> TrainConfig:
    base = TrainConfig(
        name="sks", dataset=str(dataset), resolution=64, enable_buckets=False, max_steps=4, dim=4, alpha=2.0,
        lr="1e-3", optimizer="adamw", mixed_precision="no", cache_latents_to_disk=False, save_precision="fp32",
        log_every_n_steps=1, seed=42, lr_scheduler="constant",
    )
    return dataclasses.replace(base, **kw)
