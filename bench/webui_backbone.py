"""In-place WebUI (ldm) backbone vs the standalone diffusers backbone: step time and memory.

Both train the same LoRA with the real loop (`lib_lora.training.run.train`) on the same
random-weight SD1.5-shaped model and generated data. The ldm model is laid out like the
WebUI's `shared.sd_model` (tests/webui/conftest.py builds it from the real ldm classes).

    python bench/webui_backbone.py --size tiny --steps 20                  # CPU, seconds
    python bench/webui_backbone.py --size full --resolution 256 --steps 4  # CPU, minutes
    python bench/webui_backbone.py --size full --device cuda --dtype fp16 --steps 300   # GPU

Each backbone runs in its own process (so peak memory is its own); prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # ldm_shapes: the tiny model's layout as ldm's classes take it

FULL_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
FULL_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def shapes():
    spec = importlib.util.spec_from_file_location("webui_shapes", ROOT / "tests" / "webui" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compvis_state_dict(size: str):
    """A deterministic compvis-keyed state dict (tiny: the tiny checkpoint's; full: random SD1.5)."""
    from lib_lora.training.tiny_model import TINY_SEED, random_single_file

    return random_single_file("sd15", full_size=size == "full", seed=TINY_SEED if size == "tiny" else 0)


def webui_model(sd: dict, size: str):
    """The WebUI-shaped ldm model holding `sd`."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm_shapes import TINY_LDM_UNET_KWARGS, TINY_LDM_VAE_KWARGS
    from transformers import CLIPTextModel

    from lib_lora.training.models import sd15_text_encoder_config
    from lib_lora.training.tiny_model import tiny_clip_config
    from lib_lora.training.tokenizer import load_clip_tokenizer

    s = shapes()
    tiny = size == "tiny"
    unet = UNetModel(**(TINY_LDM_UNET_KWARGS if tiny else FULL_UNET))
    vae = s.AutoencoderKLShape(TINY_LDM_VAE_KWARGS if tiny else FULL_VAE)
    clip = CLIPTextModel(tiny_clip_config() if tiny else sd15_text_encoder_config())

    def part(prefix):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    unet.load_state_dict(part("model.diffusion_model."))
    vae.load_state_dict(part("first_stage_model."))
    te = part("cond_stage_model.transformer.")
    te.pop("text_model.embeddings.position_ids", None)
    clip.load_state_dict(te, strict=False)
    cond = s.CustomWordsShape(s.FrozenCLIPEmbedderShape(clip, load_clip_tokenizer()))
    model = s.LatentDiffusionShape(unet, vae, cond).eval()
    for p in model.parameters():  # the WebUI leaves requires_grad on
        p.requires_grad_(True)
    return model


def make_dataset(folder: Path, n: int, res: int) -> Path:
    import numpy as np
    from PIL import Image

    d = folder / "1_sks"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"sks, tag{i}", encoding="utf-8")
    return folder


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def state_hash(module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def one(args) -> dict:
    import torch

    from lib_lora.config import TrainConfig
    from lib_lora.hosts.ldm_backbone import LdmBackbone, preserve_model_state
    from lib_lora.training.run import train

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    sd = compvis_state_dict(args.size)
    tmp = Path(tempfile.mkdtemp(prefix="fastlora-bench-"))
    data = make_dataset(tmp / "data", 4, args.resolution)
    if args.backbone == "ldm":
        model = webui_model(sd, args.size).to(device, dtype)
        del sd
        bb = LdmBackbone(model, model_name=f"{args.size}-ldm")
        before = state_hash(model)
        guard = preserve_model_state(model)
    else:
        from diffusers import DDPMScheduler

        from lib_lora.training.backbone import DiffusersBackbone
        from lib_lora.training.models import modules_from_state_dict, sd15_scheduler_config
        from lib_lora.training.tokenizer import load_clip_tokenizer

        unet, vae, te = modules_from_state_dict(sd, f"{args.size}.safetensors")
        del sd
        bb = DiffusersBackbone(unet, vae, te, load_clip_tokenizer(), DDPMScheduler.from_config(sd15_scheduler_config()),
                               model_name=f"{args.size}-diffusers").to(device, dtype)
        model, before, guard = None, "", None
    cfg = TrainConfig(name=f"bench_{args.backbone}", dataset=str(data), resolution=args.resolution,
                      enable_buckets=False, max_steps=args.steps, dim=args.dim, alpha=args.dim / 2,
                      lr="1e-4", optimizer="adamw", lr_scheduler="constant", cache_latents_to_disk=False,
                      mixed_precision="no" if args.dtype == "fp32" else args.dtype, log_every_n_steps=1,
                      output_dir=str(tmp / "out"), run_dir=str(tmp / "run"), device=str(device), seed=1)
    stamps: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = rss_mb()
    t0 = time.perf_counter()
    if guard is not None:
        with guard:
            train(cfg, backbone=bb, on_event=lambda ev: stamps.append(time.perf_counter()) if ev["kind"] == "loss" else None)
    else:
        train(cfg, backbone=bb, on_event=lambda ev: stamps.append(time.perf_counter()) if ev["kind"] == "loss" else None)
    total = time.perf_counter() - t0
    steady = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1) if len(stamps) > 1 else float("nan")
    out = {"backbone": args.backbone, "size": args.size, "device": str(device), "dtype": args.dtype,
           "resolution": args.resolution, "steps": args.steps, "s_per_step": steady, "total_s": total,
           "rss_before_train_mb": rss0, "rss_growth_mb": rss_mb() - rss0}
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if model is not None:
        out["host_weights_identical"] = state_hash(model) == before
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--backbone", choices=["ldm", "diffusers"], help="(internal) run one backbone and print JSON")
    args = ap.parse_args()
    if args.backbone:
        print("RESULT " + json.dumps(one(args)))
        return 0
    rows = []
    for name in ("ldm", "diffusers"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--backbone", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        rows.append(json.loads(line[-1][7:]))
    keys = ["backbone", "size", "device", "dtype", "resolution", "steps", "s_per_step", "total_s", "rss_growth_mb",
            "peak_gpu_gib", "host_weights_identical"]
    keys = [k for k in keys if any(k in r for r in rows)]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
