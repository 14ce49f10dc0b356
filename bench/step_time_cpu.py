"""Training step time on the CPU: the tiny model and a full-size SD1.5 (random weights) at 256².

Prints a table. A full-size step takes seconds, so that run is short (a warm-up step, then a
few timed ones). Usage:  python bench/step_time_cpu.py [--full-steps 3] [--tiny-steps 30] [--skip-full]
Wall time per step is the median of the timed steps; CPU time is reported beside it, since a
busy shared machine inflates wall time.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import sd15_random_backbone  # noqa: E402

from lib_lora.config import TrainConfig  # noqa: E402
from lib_lora.demo import make_dataset  # noqa: E402
from lib_lora.training import data as data_mod  # noqa: E402
from lib_lora.training.run import Trainer  # noqa: E402


def measure(label: str, backbone, dataset: Path, resolution: int, steps: int, warmup: int, **kw) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            name="bench", dataset=str(dataset), output_dir=f"{tmp}/out", run_dir=f"{tmp}/run", resolution=resolution,
            max_steps=steps + warmup, device="cpu", optimizer="adamw8bit", lr="1e-4", cache_latents_to_disk=False, **kw,
        )
        t0 = time.perf_counter()
        tr = Trainer(cfg, backbone=backbone)
        tr.state.session_id = "bench"
        tr.setup()
        setup_s = time.perf_counter() - t0
        walls, cpus = [], []
        for i, batch in enumerate(data_mod.iter_batches(tr.state.dataset.items, cfg, steps + warmup, cfg.seed)):
            w, c = time.perf_counter(), time.process_time()
            tr.train_step(batch).item()  # sync, so the step's time is all counted
            if i >= warmup:
                walls.append(time.perf_counter() - w)
                cpus.append(time.process_time() - c)
        tr.close()
    return {
        "model": label, "res": f"{resolution}²", "dim/alpha": f"{cfg.dim}/{cfg.alpha:g}", "steps": steps,
        "setup s": f"{setup_s:.1f}", "s/step (wall)": f"{statistics.median(walls):.3f}",
        "s/step (cpu)": f"{statistics.median(cpus):.3f}",
        "peak RSS GB": f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f}",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiny-steps", type=int, default=30)
    ap.add_argument("--full-steps", type=int, default=3)
    ap.add_argument("--skip-full", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from lib_lora.training.models import load_backbone

        tiny = load_backbone("tiny")
        for res in (64, 128):
            ds = make_dataset(Path(tmp) / f"tiny{res}", count=4, size=res, repeats=10)
            rows.append(measure("tiny", tiny, ds, res, args.tiny_steps, 3, dim=16, alpha=8.0))
        del tiny
        if not args.skip_full:
            ds = make_dataset(Path(tmp) / "full", count=2, size=256, repeats=10)
            t = time.perf_counter()
            full = sd15_random_backbone("cpu", torch.float32)
            print(f"full-size SD1.5 built with random weights in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            rows.append(measure("SD1.5 full", full, ds, 256, args.full_steps, 1, dim=128, alpha=64.0))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
