"""Profile the training loop on the CPU with torch.profiler: where a step's time goes.

Runs the real Trainer (tiny model by default, or the full-size random SD1.5 with --full) for
a few warm-up steps, then profiles N steps and prints the top operators by self CPU time,
plus the split of a step into data feed / forward+backward+optimizer.

    python bench/profile_loop.py [--full] [--resolution 256] [--steps 10] [--trace trace.json]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import bench_common  # noqa: F401
import torch
from bench_common import make_dataset, median_ms, ready_trainer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="full-size SD1.5 architecture (random weights)")
    ap.add_argument("--resolution", type=int, default=None, help="256 (tiny) / 128 (--full)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--train-te", type=int, default=1)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--trace", default=None, help="write a Chrome trace here")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    from lib_lora.config import TrainConfig
    from lib_lora.training import data as data_mod

    res = args.resolution or (128 if args.full else 256)
    print(f"# CPU {os.cpu_count()} cores, torch {torch.__version__}, {'full-size' if args.full else 'tiny'} at {res}²,"
          f" load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ds = make_dataset(work / "data", n_images=8, repeats=10, size=res)
        bb = None
        if args.full:
            from bench_common import sd15_random_backbone

            bb = sd15_random_backbone("cpu")
        cfg = TrainConfig(
            name="prof", dataset=str(ds), output_dir=str(work / "out"), run_dir=str(work / "run"), overwrite=True,
            resolution=res, optimizer="adamw", lr="1e-4", log_every_n_steps=10**6, cache_latents_to_disk=False,
            train_text_encoder=bool(args.train_te),
        )  # fmt: skip
        tr = ready_trainer(cfg, bb, name="prof")
        try:
            batches = list(data_mod.iter_batches(tr.state.dataset.items, cfg, 3 + 2 * args.steps, 0))
            for b in batches[:3]:
                tr.train_step(b)
            feed, comp = [], []
            for b in batches[3 : 3 + args.steps]:
                t0 = time.process_time()
                d = tr.step_inputs(b)
                t1 = time.process_time()
                tr.compute_step(d)
                t2 = time.process_time()
                feed.append(t1 - t0)
                comp.append(t2 - t1)
            print(f"# median CPU time per step: data feed {median_ms(feed):.3f} ms, compute+optimizer {median_ms(comp):.1f} ms")
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                for b in batches[3 + args.steps :]:
                    tr.train_step(b)
        finally:
            tr.close()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
