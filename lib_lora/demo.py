"""`python -m lib_lora demo`: draw a small dataset, train the tiny model on it, export the LoRA.

Everything happens on the CPU in well under two minutes and needs no download: the images
are drawn with PIL (one simple character in varied poses, sizes and backgrounds, with
captions) and the base model is the built-in tiny SD1.5-shaped model.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from lib_lora.config import TrainConfig, validate

DEMO_NAME = "fastlora_chan"
BACKGROUNDS = {
    "blue sky": ((120, 180, 240), (200, 230, 255)),
    "green grass": ((90, 170, 80), (150, 210, 120)),
    "sunset": ((250, 140, 80), (120, 60, 140)),
    "white background": ((250, 250, 250), (235, 235, 235)),
    "night": ((20, 24, 60), (60, 70, 120)),
    "indoors": ((200, 170, 130), (150, 120, 90)),
}
POSES = {
    "arms up": (-60, -120),
    "arms down": (60, 120),
    "waving": (-60, 120),
    "arms out": (0, 180),
}


def _gradient(size: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    im = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(im)
    for y in range(size):
        f = y / max(1, size - 1)
        d.line([(0, y), (size, y)], fill=tuple(int(a + (b - a) * f) for a, b in zip(top, bottom, strict=True)))
    return im


def draw_character(size: int, background: str, pose: str, cx: float, cy: float, scale: float, smile: bool) -> Image.Image:
    """The demo character: a round face, yellow twin-tail hair, a red dress, arms per pose."""
    im = _gradient(size, *BACKGROUNDS[background])
    d = ImageDraw.Draw(im)
    s = size * scale
    x, y = size * cx, size * cy
    head_r = 0.16 * s
    body_top, body_bot = y - 0.02 * s, y + 0.38 * s
    # arms (behind the body)
    for side, angle in zip((-1, 1), POSES[pose], strict=True):
        sx, sy = x + side * 0.1 * s, body_top + 0.06 * s
        a = math.radians(angle)
        ex, ey = sx + math.cos(a) * 0.28 * s * (1 if side > 0 else -1) * -1, sy + math.sin(a) * 0.28 * s
        d.line([(sx, sy), (ex, ey)], fill=(250, 215, 180), width=max(2, int(0.05 * s)))
    # dress
    d.polygon([(x - 0.1 * s, body_top), (x + 0.1 * s, body_top), (x + 0.22 * s, body_bot), (x - 0.22 * s, body_bot)],
              fill=(210, 30, 40))
    # legs
    for side in (-1, 1):
        d.line([(x + side * 0.08 * s, body_bot), (x + side * 0.1 * s, body_bot + 0.16 * s)],
               fill=(250, 215, 180), width=max(2, int(0.05 * s)))
    # twin tails and hair
    for side in (-1, 1):
        d.ellipse([x + side * 1.25 * head_r - 0.45 * head_r, y - 1.7 * head_r,
                   x + side * 1.25 * head_r + 0.45 * head_r, y - 0.2 * head_r], fill=(250, 210, 40))
    d.ellipse([x - head_r, y - 2.2 * head_r, x + head_r, y - 0.2 * head_r], fill=(250, 215, 180))
    d.chord([x - head_r, y - 2.25 * head_r, x + head_r, y - 0.6 * head_r], 180, 360, fill=(250, 210, 40))
    # face
    ey = y - 1.15 * head_r
    for side in (-1, 1):
        d.ellipse([x + side * 0.4 * head_r - 0.12 * head_r, ey - 0.15 * head_r,
                   x + side * 0.4 * head_r + 0.12 * head_r, ey + 0.15 * head_r], fill=(40, 90, 200))
    my = y - 0.6 * head_r
    if smile:
        d.arc([x - 0.35 * head_r, my - 0.3 * head_r, x + 0.35 * head_r, my + 0.1 * head_r], 20, 160, fill=(150, 30, 40),
              width=max(1, int(0.06 * head_r)))
    else:
        d.line([(x - 0.2 * head_r, my), (x + 0.2 * head_r, my)], fill=(150, 30, 40), width=max(1, int(0.06 * head_r)))
    return im


def make_dataset(folder: Path, count: int = 16, size: int = 128, seed: int = 0, repeats: int = 10) -> Path:
    """Draw `count` captioned images into folder/<repeats>_<name>; returns `folder`."""
    from lib_lora.atomic import atomic_path, atomic_write_text

    rng = random.Random(seed)
    sub = folder / f"{repeats}_{DEMO_NAME}"
    sub.mkdir(parents=True, exist_ok=True)
    bgs, poses = list(BACKGROUNDS), list(POSES)
    for i in range(count):
        bg, pose = bgs[i % len(bgs)], poses[(i * 3 + i // len(bgs)) % len(poses)]
        scale = rng.uniform(0.75, 1.05)
        smile = rng.random() < 0.6
        im = draw_character(size, bg, pose, rng.uniform(0.4, 0.6), rng.uniform(0.45, 0.55), scale, smile)
        with atomic_path(sub / f"{i:02d}.png") as tmp:
            im.save(tmp, format="PNG")
        tags = [DEMO_NAME, "1girl", "yellow hair", "twintails", "red dress", "blue eyes", pose,
                "smile" if smile else "closed mouth", bg]  # fmt: skip
        atomic_write_text(sub / f"{i:02d}.txt", ", ".join(tags) + "\n")
    return folder


def demo_config(out: Path, family: str = "sd15") -> TrainConfig:
    """The demo's run on the built-in tiny model of `family` ("sd15": `tiny`, "sdxl":
    `tiny-sdxl`, U-Net only by the SDXL family's default)."""
    from lib_lora.training.run_config import prepare_train_config

    cfg = validate(
        TrainConfig(
            name=DEMO_NAME,
            dataset=str(out / "dataset"),
            base_model="tiny-sdxl" if family == "sdxl" else "tiny",
            output_dir=str(out / "lora"),
            run_dir=str(out / "runs" / DEMO_NAME),
            overwrite=True,
            resolution=128,
            dim=16,
            alpha=8.0,
            lr="1e-3",
            batch_size=2,
            epochs=1,
            lr_warmup_steps=0.05,
            device="cpu",
            log_every_n_steps=10,
            sample_images=2,  # half-way and at the end, into <run folder>/samples
            comment=f"Fast LoRA demo: tiny {'SDXL ' if family == 'sdxl' else ''}model, drawn dataset",
        )
    )
    return prepare_train_config(None, cfg)  # the family's defaults where the demo sets none


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="draw a sample dataset, train the tiny model on it (CPU, < 2 min)")
    p.add_argument("--out", default="output/demo", help="folder for the dataset, run and LoRA (default: output/demo)")
    p.add_argument("--family", choices=("sd15", "sdxl"), default="sd15",
                   help="which built-in tiny model to train: sd15 (tiny) or sdxl (tiny-sdxl); default sd15")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from lib_lora.progress import TqdmProgress
    from lib_lora.training.cli import bar_events
    from lib_lora.training.metadata import summary
    from lib_lora.training.run import train

    out = Path(args.out)
    make_dataset(out / "dataset")
    print(f"Dataset drawn: {out / 'dataset'}", file=sys.stderr)
    bar = TqdmProgress(desc="demo", unit="step")

    try:
        result = train(demo_config(out, args.family), progress=bar, on_event=bar_events(bar))
    finally:
        bar.close()
    print(f"LoRA written: {result.lora_path}")
    print(f"final loss {result.final_loss:.4f} after {result.steps} steps; run folder {result.run_dir}")
    print(f"sample images: {Path(result.run_dir) / 'samples'}")
    print("metadata:")
    print(summary(result.metadata))
    return 0
