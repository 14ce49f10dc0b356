"""Training-step speed of the real loop (`Trainer.train_step`) on a full-size SD1.5 architecture.

Random weights (compute does not depend on their values), the seed recipe: LoRA dim 128,
alpha 64 on the U-Net and the text encoder, cached latents, AdamW8bit where it can step.
For each batch size and precision: samples/s, median ms/step after warm-up (device-synced),
peak memory, FLOPs of one step counted by torch's FlopCounterMode, achieved TFLOP/s and the
fraction of a matmul peak measured in the same run (bf16 on CUDA, fp32 on the CPU).

    python bench/train_speed.py                      # CUDA: batch 1,4,8 x fp16,bf16 at 512²
    python bench/train_speed.py --cpu                # CPU: fp32, batch 1 at 128² (development)
    python bench/train_speed.py --cpu --resolution 256 --batches 1   # kohya's CPU figure's shape
    python bench/train_speed.py --json out.json
    python bench/train_speed.py --family sdxl        # CUDA: full-size SDXL, batch 1 at 1024², U-Net LoRA
                                                     # dim 32, gradient checkpointing, AdamW8bit
    python bench/train_speed.py --family sdxl --cpu --resolution 256 --threads 1   # CPU: full-size SDXL at 256²
                                                     # (≈ 16 GB RSS: fp32 weights of 3.47 B parameters)
    python bench/train_speed.py --family sdxl --cpu --tiny   # CPU: tiny-sdxl's architecture at 128²

With --family sdxl the recipe is the SDXL one (U-Net only, dim 32, alpha 16, cached text-encoder
outputs, gradient checkpointing on unless --no-gradient-checkpointing) on the full-size SDXL base
1.0 architecture with random weights (U-Net 2.567 B parameters), unless --tiny. AdamW8bit is asked
for; on the CPU, where bitsandbytes cannot step it, the run uses torch AdamW and the table's
optimizer column says so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import bench_common  # noqa: F401 - puts the checkout's lib_lora first on sys.path
import torch
from bench_common import make_dataset, median_ms, sd15_random_backbone, sdxl_random_backbone, table

FLOOR_TFLOP_512 = 1.6  # one training sample at 512²: forward 0.80 + backward to the inputs


def clock(device: torch.device) -> float:
    """Wall time on CUDA; the process's CPU time on the CPU, where other jobs share the cores."""
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def matmul_peak_tflops(device: torch.device) -> tuple[float, str]:
    """Best of a few large matmuls: bf16 8192³ on CUDA, fp32 1024³ on the CPU (per CPU-second,
    divided by the threads in use, so it compares with the step's CPU-time TFLOP/s)."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 20
    else:
        n, dtype, reps = 1024, torch.float32, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        sync(device)
        t0 = clock(device)
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, (clock(device) - t0) / reps)
    if device.type == "cpu":
        best /= torch.get_num_threads()  # CPU-seconds over all threads -> seconds of the whole CPU set
    return 2 * n**3 / best / 1e12, f"{str(dtype).replace('torch.', '')} {n}³"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_trainer(bb, dataset: Path, work: Path, resolution: int, batch: int, precision: str, optimizer: str, extra: dict):
    """A Trainer through its own setup phases, with random cached latents (no VAE pass)."""
    from lib_lora.config import TrainConfig
    from lib_lora.training.run import Trainer

    recipe = {"dim": 128, "alpha": 64.0}
    if getattr(bb, "family", None) is not None and bb.family.name == "sdxl":
        recipe = {"dim": 32, "alpha": 16.0, "train_text_encoder": False}
    cfg = TrainConfig(
        name="speed", dataset=str(dataset), output_dir=str(work / "out"), run_dir=str(work / "run"), overwrite=True,
        resolution=resolution, batch_size=batch, mixed_precision=precision, device=str(bb.device),
        optimizer=optimizer, lr="1e-4", log_every_n_steps=10**6, cache_latents_to_disk=False, **recipe, **extra,
    )  # fmt: skip
    tr = Trainer(cfg, bb)
    tr.state.started_at, tr.state.name = time.time(), "speed"
    tr.prepare_run_dir()
    tr.load_data()
    tr.load_model()
    gen = torch.Generator().manual_seed(0)
    tr.state.latent_of = {
        id(it): torch.randn((4, it.bucket[1] // 8, it.bucket[0] // 8), generator=gen) for it in tr.state.dataset.items
    }
    tr.build_network()
    tr.resolve_lr()
    tr.build_optimizer()
    tr.state.tb = None
    if hasattr(tr, "begin_reliability"):
        tr.begin_reliability()  # the loop's step guard (issue 5) is part of a real step
    return tr


def count_flops(tr, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        tr.train_step(batch)
    return float(fc.get_total_flops())


def measure(bb, dataset, work, args, batch: int, precision: str, peak: float) -> dict:
    from lib_lora.training import data as data_mod

    dev = bb.device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[precision]
    bb.to(dev, dtype)
    extra = {"channels_last": args.channels_last, "compile_unet": args.compile,
             "gradient_checkpointing": args.gradient_checkpointing}  # fmt: skip
    tr = make_trainer(bb, dataset, work, args.resolution, batch, precision, args.optimizer, extra)
    try:
        steps = args.warmup + args.steps + 1
        batches = list(data_mod.iter_batches(tr.state.dataset.items, tr.cfg, steps, 0))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        for b in batches[: args.warmup]:
            tr.train_step(b)
        sync(dev)
        times, cpu_times = [], []
        if args.sync_debug and dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")  # every host<->device sync in a step is reported
        for b in batches[args.warmup : args.warmup + args.steps]:
            t0, c0 = time.perf_counter(), time.process_time()
            tr.train_step(b)
            sync(dev)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        flops = count_flops(tr, batches[-1])
        ms = median_ms(times)
        if dev.type == "cuda":
            mem = torch.cuda.max_memory_allocated(dev) / 2**30
        else:
            mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS
        # On the CPU the rate is per CPU-second of all threads (a busy machine inflates wall time).
        busy = ms if dev.type == "cuda" else median_ms(cpu_times) / torch.get_num_threads()
        tflops = flops / (busy / 1000) / 1e12
        return {
            "batch": batch, "precision": precision if precision != "no" else "fp32",
            "samples_per_s": round(batch / (ms / 1000), 3), "ms_per_step": round(ms, 1),
            "it_per_s": round(1000 / ms, 3), "peak_mem_gib": round(mem, 2), "tflop_per_step": round(flops / 1e12, 3),
            "tflop_per_s": round(tflops, 3), "frac_of_peak": round(tflops / peak, 3),
            "cpu_ms_per_step": round(median_ms(cpu_times), 1),
            "optimizer": _optimizer_text(args.optimizer, tr.state.optim.used), "steps_timed": len(times),
        }  # fmt: skip
    finally:
        tr.close()


def _optimizer_text(asked: str, used: str) -> str:
    """The optimizer that stepped, and the one asked for where it differs (8-bit AdamW cannot
    step on the CPU: the loop falls back to torch AdamW there)."""
    name = used.rsplit(".", 1)[-1]
    return name if name.lower() == asked.lower() else f"{name} ({asked} asked)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (fp32, reduced resolution)")
    ap.add_argument("--resolution", type=int, default=None, help="default 512 on CUDA, 128 with --cpu")
    ap.add_argument("--batches", type=int, nargs="*", default=None, help="default 1 4 8 (CUDA), 1 (CPU)")
    ap.add_argument("--precisions", nargs="*", default=None, help="fp16 bf16 (CUDA), no = fp32 (CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--optimizer", default="adamw8bit")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true", default=None)
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    ap.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--tiny", action="store_true", help="--family sdxl: tiny-sdxl's architecture (no full-size)")
    ap.add_argument("--sync-debug", action="store_true", help="CUDA: warn on every host sync in the timed steps")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="also write the rows as JSON to this file ('-' = stdout)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    dev = torch.device("cuda" if cuda else "cpu")
    xl = args.family == "sdxl"
    args.resolution = args.resolution or ((1024 if xl else 512) if cuda else 128)
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = xl  # SDXL's 12 GB recipe; SD1.5's measured figures are without
    if xl and cuda and args.batches is None:
        args.batches = [1]
    args.batches = args.batches or ([1, 4, 8] if cuda else [1])
    args.precisions = args.precisions or (["fp16", "bf16"] if cuda else ["no"])
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.steps = args.steps if args.steps is not None else (20 if cuda else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak, peak_what = matmul_peak_tflops(dev)
    machine = torch.cuda.get_device_name(dev) if cuda else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"# {machine}; torch {torch.__version__}; {args.family}{' tiny' if args.tiny else ''}; {args.resolution}²; matmul peak {peak:.2f} TFLOP/s ({peak_what});"
          f" load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    bb = sdxl_random_backbone(dev, full_size=not args.tiny) if xl else sd15_random_backbone(dev)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset = make_dataset(work / "data", n_images=max(args.batches) * 2, repeats=10, size=args.resolution)
        for precision in args.precisions:
            for batch in args.batches:
                row = measure(bb, dataset, work, args, batch, precision, peak)
                rows.append(row)
                print(json.dumps(row), flush=True)
    cols = ["batch", "precision", "samples_per_s", "ms_per_step", "cpu_ms_per_step", "peak_mem_gib", "tflop_per_step",
            "tflop_per_s", "frac_of_peak", "optimizer"]
    print(table(rows, cols))
    if args.resolution == 512:
        print(f"# floor: {FLOOR_TFLOP_512} TFLOP per sample at 512²")
    out = {"machine": machine, "torch": torch.__version__, "resolution": args.resolution, "family": args.family,
           "matmul_peak_tflops": peak, "matmul_peak_what": peak_what, "rows": rows,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv[1:]}  # fmt: skip
    if args.json == "-":
        print(json.dumps(out, indent=1))
    elif args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
