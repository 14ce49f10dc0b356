"""What the WebUI host tests (A1111 and Forge) train on: a three-image dataset and a tiny config;
for the Forge tests, the job runner and what they compare of Forge's state."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
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


# --------------------------------------------------------------------------------------------
# Forge (its engines from tests/webui/fake_forge)


def run(host, cfg, on_event=None):
    return host.run_job(f"Training {cfg.name}", host.train, cfg, on_event=on_event)


def roots(engine) -> list[torch.nn.Module]:
    objs = engine.forge_objects_original
    return [objs.unet.model, objs.clip.cond_stage_model, objs.vae.first_stage_model]


def forge_state(engine, mm, state_hash, grad_flags) -> dict:
    """Everything of Forge's the job may touch: weights (bytes), requires_grad, the parameter
    objects themselves, the memory manager's loaded patchers in order, the LoRA loaders' state."""
    objs = engine.forge_objects_original
    loaders = [objs.unet.lora_loader, objs.clip.patcher.lora_loader]
    return {
        "weights": [state_hash(r) for r in roots(engine)],
        "grad": [grad_flags(r) for r in roots(engine)],
        # the parameter objects, less the LoRA-patched ones: Forge makes new ones at each bake
        "params": [[id(p) for k, p in r.named_parameters() if k not in r.lora_loader.backup] for r in roots(engine)],
        "loaded": [id(lm.model) for lm in mm.current_loaded_models],
        "loras": [(lo.loaded_hash, sorted(lo.backup)) for lo in loaders],
        "forward_overrides": sum("forward" in m.__dict__ for r in roots(engine) for m in r.modules()),
        "objects": (id(engine.forge_objects.unet), id(engine.forge_objects.clip), engine.current_lora_hash),
    }


def bake_a_lora(engine, mm, strength=1.0):
    """What Forge does for `<lora:other:1>`: clones of the original patchers carrying the LoRA's
    patches become forge_objects, and loading them through the memory manager bakes them in."""
    original = engine.forge_objects_original
    unet, clip = original.unet.clone(), original.clip.clone()
    g = torch.Generator().manual_seed(3)

    def patches(model, n):
        keys = [k for k, p in model.named_parameters() if k.endswith(".weight") and p.dim() == 2][:n]
        out = {}
        for k in keys:
            w = dict(model.named_parameters())[k]
            out[k] = ("lora", (torch.randn(w.shape[0], 2, generator=g), torch.randn(2, w.shape[1], generator=g), 1.0))
        return out

    unet.add_patches(filename="other.safetensors", patches=patches(unet.model, 6), strength_patch=strength)
    clip.add_patches(filename="other.safetensors", patches=patches(clip.cond_stage_model, 4), strength_patch=strength)
    engine.forge_objects.unet, engine.forge_objects.clip = unet, clip
    engine.forge_objects_after_applying_lora = engine.forge_objects.shallow_copy()
    engine.current_lora_hash = "[['other.safetensors', 1.0, 1.0, False]]"
    mm.load_models_gpu([unet, clip.patcher, engine.forge_objects.vae.patcher])  # the next generation loads them
