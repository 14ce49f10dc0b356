"""Cost of the sample images made during training (training/sample.py): seconds per image.

One image = 2 x `--sample-steps` U-Net passes (guidance) + the text encoder + one VAE decode,
with the LoRA applied. Prints a table per model and resolution: seconds per image (median of
`--repeats`), and what that adds to a run with the Train tab's 4 sample points.

Usage:
  python bench/sample_time.py                       # tiny model at 64 and 128 on the CPU
  python bench/sample_time.py --full --resolution 256 --steps 10   # full-size SD1.5 (random weights)
  python bench/sample_time.py --full --device cuda --dtype fp16 --resolution 512
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import make_dataset, ready_trainer, sd15_random_backbone, table  # noqa: E402

from lib_lora.config import TrainConfig  # noqa: E402


def measure(label: str, backbone, resolution: int, steps: int, repeats: int, precision: str, device: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data", n_images=2, repeats=1, size=resolution)
        cfg = TrainConfig(name="bench", dataset=str(data), output_dir=f"{tmp}/out", run_dir=f"{tmp}/run",
                          resolution=resolution, device=device, mixed_precision=precision, optimizer="adamw",
                          lr="1e-4", cache_latents_to_disk=False, sample_steps=steps)  # fmt: skip
        tr = ready_trainer(cfg, backbone)
        try:
            times = []
            for i in range(repeats + 1):  # the first one warms up (allocations, kernels)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                tr.state.step = i
                tr.make_samples()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t0)
        finally:
            tr.close()
    per = statistics.median(times)
    return {"model": label, "resolution": f"{resolution}²", "precision": precision if precision != "no" else "fp32", "ddim_steps": steps,
            "s_per_image": round(per, 3), "4_sample_points_s": round(4 * per, 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="full-size SD1.5 (random weights) instead of the tiny model")
    ap.add_argument("--resolution", type=int, nargs="*", default=None, help="default 64 128 (tiny), 512 (full)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps per image (the default of sample_steps)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[args.dtype]
    if args.full:
        backbone, label = sd15_random_backbone("cpu"), "SD1.5 full-size (random)"
        resolutions = args.resolution or [512]
    else:
        from lib_lora.training.models import load_backbone

        backbone, label = load_backbone("tiny", device="cpu"), "tiny"
        resolutions = args.resolution or [64, 128]
    backbone.to(args.device, torch.float32 if args.dtype == "fp32" else getattr(torch, {"fp16": "float16",
                                                                                     "bf16": "bfloat16"}[args.dtype]))  # fmt: skip
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"# sample images: {where}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    rows = [measure(label, backbone, r, args.steps, args.repeats, precision, args.device) for r in resolutions]
    print(table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
