"""Samples/s of data-parallel training against the process count (training/distributed.py).

    python bench/ddp_scaling.py --processes 1 2 [--batch 2] [--steps 20] [--resolution 128]

Each process count trains the same run through `torch.distributed.run --nproc_per_node N -m
lib_lora train` (gloo between CPU processes, nccl between GPUs with --device auto on a GPU
machine) on the built-in tiny model, `--batch` images per process (weak scaling: the global
batch grows with N). The figure is the run's own step clock (the 'done' event's
seconds_per_step: training steps only, no start-up, caching or saving), as samples/s = global
batch / s per step. On the CPU each process gets OMP_NUM_THREADS=--threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def dataset(root: Path, n: int, size: int) -> Path:
    sub = root / "10_tok"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(f"tok, tag{i}", encoding="utf-8")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, args: argparse.Namespace, data: Path, work: Path) -> dict:
    name = f"ddp{n}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "lib_lora", "train", str(data), "--name", name,
           "--output-dir", str(work / "out"), "--run-dir", str(work / name), "--base-model", args.base_model,
           "--resolution", str(args.resolution), "--enable-buckets", "false", "--batch-size", str(args.batch),
           "--max-steps", str(args.steps), "--optimizer", "adamw", "--lr", "1e-4", "--dim", "16", "--alpha", "8",
           "--device", args.device, "--state-every-n-steps", "0", "--log-every-n-steps", "5"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    t0 = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{n} processes failed:\n{res.stderr[-3000:]}")
    events = [json.loads(line) for line in (work / name / "logs" / "events.jsonl").read_text().splitlines()]
    done = [e for e in events if e["kind"] == "done"][-1]
    sps = done["seconds_per_step"]
    return {"processes": n, "global": args.batch * n, "s_per_step": sps, "samples_s": args.batch * n / sps,
            "wall": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=2, help="images per process per step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--base-model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    p.add_argument("--images", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        data = dataset(Path(d) / "data", args.images, args.resolution)
        rows = [run(n, args, data, Path(d) / f"w{n}") for n in args.processes]
    base = rows[0]["samples_s"] / rows[0]["processes"]
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}")
    print(f"# {args.base_model} {args.resolution}², batch {args.batch}/process, {args.steps} steps, {args.device}, "
          f"OMP_NUM_THREADS={args.threads}")
    print("| processes | global batch | s/step | samples/s | speed-up | efficiency | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        up = r["samples_s"] / rows[0]["samples_s"]
        eff = r["samples_s"] / (base * r["processes"])
        print(f"| {r['processes']} | {r['global']} | {r['s_per_step']:.3f} | {r['samples_s']:.2f} | {up:.2f}x | "
              f"{eff:.0%} | {r['wall']:.0f} |")


if __name__ == "__main__":
    main()
