"""Step time and peak memory of each network type (lora, locon, loha, lokr, dora) at the seed
recipe's shape: full-size SD1.5 (random weights), dim 128 / alpha 64, U-Net + text-encoder
LoRA, AdamW, batch 1. Each type runs in its own process, so each peak RSS is its own.

    python bench/lycoris_types.py --resolution 128 --steps 2 --warmup 1 --threads 1
    python bench/lycoris_types.py --device cuda --resolution 512 --steps 20 --warmup 3   # GPU
    python bench/lycoris_types.py --family sdxl --device cuda --resolution 1024          # GPU: full-size SDXL
    python bench/lycoris_types.py --family sdxl --tiny --resolution 128                  # CPU: tiny-sdxl's architecture

With --family sdxl the recipe is SDXL's (U-Net only, dim 32 / alpha 16, cached text-encoder
outputs), on the full-size SDXL base architecture or, with --tiny, on tiny-sdxl's (random weights).

Prints a Markdown table (wall and CPU seconds per step, median of the timed steps; peak RSS,
and on a GPU torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common  # noqa: F401 - puts the checkout first on sys.path
import torch
from bench_common import sd15_random_backbone, sdxl_random_backbone

TYPES = ["lora", "locon", "loha", "lokr", "dora"]


def one(kind: str, args: argparse.Namespace) -> dict:
    from lib_lora.config import TrainConfig
    from lib_lora.demo import make_dataset
    from lib_lora.training import data as data_mod
    from lib_lora.training.run import Trainer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ds = make_dataset(Path(tmp) / "ds", count=2, size=args.resolution, repeats=10)
        if args.family == "sdxl":
            bb = sdxl_random_backbone(args.device, torch.float32, full_size=not args.tiny)
            recipe = {"dim": 32, "alpha": 16.0, "train_text_encoder": False}
        else:
            bb = sd15_random_backbone(args.device, torch.float32)
            recipe = {"dim": 128, "alpha": 64.0}
        cfg = TrainConfig(
            name="bench", dataset=str(ds), output_dir=f"{tmp}/out", run_dir=f"{tmp}/run", resolution=args.resolution,
            max_steps=args.steps + args.warmup, device=args.device, optimizer="adamw", lr="1e-4",
            network_type=kind, cache_latents_to_disk=False, **recipe,
        )  # fmt: skip
        tr = Trainer(cfg, backbone=bb)
        tr.state.session_id = "bench"
        tr.setup()
        n_params = sum(p.numel() for p in tr.state.network.parameters())
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        walls, cpus = [], []
        for i, batch in enumerate(data_mod.iter_batches(tr.state.dataset.items, cfg, args.steps + args.warmup, cfg.seed)):
            w, c = time.perf_counter(), time.process_time()
            tr.train_step(batch).item()  # a sync: the whole step is counted
            if i >= args.warmup:
                walls.append(time.perf_counter() - w)
                cpus.append(time.process_time() - c)
        gpu = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        tr.close()
    return {"type": kind, "params M": round(n_params / 1e6, 2), "s/step wall": round(statistics.median(walls), 3),
            "CPU-s/step": round(statistics.median(cpus), 3),
            "peak RSS GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "GPU peak GiB": None if gpu is None else round(gpu, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="*", default=TYPES, choices=TYPES)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--tiny", action="store_true", help="--family sdxl: tiny-sdxl's architecture (no full-size)")
    ap.add_argument("--one", choices=TYPES, help=argparse.SUPPRESS)  # the child process's type
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return 0
    rows = []
    for kind in args.types:
        cmd = [sys.executable, __file__, "--one", kind, "--resolution", str(args.resolution), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device,
               "--family", args.family] + (["--tiny"] if args.tiny else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)
    base = next((r for r in rows if r["type"] == "lora"), None)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads, {args.device}, {args.family}{' tiny' if args.tiny else ''}, {args.resolution}², load average {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    keys = [k for k in rows[0] if not (k == "GPU peak GiB" and rows[0][k] is None)] + (["CPU vs lora"] if base else [])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        if base:
            r["CPU vs lora"] = f"{r['CPU-s/step'] / base['CPU-s/step']:.2f}x"
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
