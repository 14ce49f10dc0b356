"""Shared set-up of the bench scripts: a synthetic dataset folder and small helpers."""

from __future__ import annotations

import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's lib_lora first

TAGS = ["1girl", "solo", "smile", "open mouth", "brown hair", "long hair", "blue eyes", "shirt",
        "white background", "upper body", "looking at viewer", "earrings", "hat", "jacket"]  # fmt: skip


def make_dataset(root: Path, n_images: int = 35, repeats: int = 30, size: int = 512, name: str = "zhang", seed: int = 0) -> Path:
    """`root/<repeats>_<name>/NNN.png` + `.txt` captions (random pictures, booru-style tags);
    the tutorial's shape by default. Returns the dataset folder (the parent of the subfolder)."""
    from PIL import Image

    rng = random.Random(seed)
    sub = root / f"{repeats}_{name}"
    sub.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        path = sub / f"{i:03d}.png"
        if not path.exists():
            small = Image.effect_noise((size // 8, size // 8), 64).convert("RGB")
            small.resize((size, size), Image.BICUBIC).save(path)
        tags = [name, "1girl"] + rng.sample(TAGS[1:], 6)
        (sub / f"{i:03d}.txt").write_text(", ".join(tags), encoding="utf-8")
    return root


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000.0


def table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).rjust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def ready_trainer(cfg, backbone=None, name: str = "bench"):
    """A Trainer set up up to its first step (data, model, latents, LoRA, lr, optimizer and the
    step guard), without the output-file check and TensorBoard of `Trainer.setup()`."""
    import time

    from lib_lora.training.run import Trainer

    tr = Trainer(cfg, backbone)
    tr.state.started_at, tr.state.name = time.time(), name
    tr.load_all()
    tr.state.tb = None
    tr.begin_reliability()  # the loop's step guard (issue 5) is part of a real step
    return tr


def sd15_random_backbone(device: str = "cpu", dtype=None):
    """A full-size SD1.5-shaped DiffusersBackbone with random weights (seeded), from the bundled
    configs: the compute of a real SD1.5 without a model file (none can be downloaded here)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from lib_lora.training import models
    from lib_lora.training.backbone import DiffusersBackbone
    from lib_lora.training.tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(models.sd15_unet_config())
    vae = AutoencoderKL.from_config(models.sd15_vae_config())
    te = CLIPTextModel(models.sd15_text_encoder_config())
    sched = DDPMScheduler.from_config(models.sd15_scheduler_config())
    bb = DiffusersBackbone(unet, vae, te, load_clip_tokenizer(), sched, model_name="sd15-random")
    return bb.to(device, dtype)


def sdxl_random_backbone(device: str = "cpu", dtype=None, full_size: bool = True):
    """An SDXL backbone with random weights: the full-size SDXL base 1.0 architecture
    (full_size) or tiny-sdxl's, built from tiny_model's configs with torch's default init
    (the compute of a real SDXL without a model file)."""
    import torch
    from diffusers import DDPMScheduler

    from lib_lora.training import models
    from lib_lora.training.backbone_sdxl import SDXLBackbone
    from lib_lora.training.tiny_model import build_sdxl_modules
    from lib_lora.training.tokenizer import load_clip_tokenizer, load_clip_tokenizer_2

    torch.manual_seed(0)
    unet, vae, te1, te2 = build_sdxl_modules(full_size, device="cpu")
    sched = DDPMScheduler.from_config(models.sd15_scheduler_config())
    bb = SDXLBackbone(unet, vae, te1, te2, load_clip_tokenizer(), load_clip_tokenizer_2(), sched,
                      model_name="sdxl-random" if full_size else "tiny-sdxl-random")
    return bb.to(device, dtype)
