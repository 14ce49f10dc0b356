"""Is the data pipeline ever the bottleneck? A step with real data vs a step with synthetic data.

Both run the real loop on the tiny model: "real" is `Trainer.train_step(batch)` over the
dataset's own batches (latent lookup, stacking, seeded noise, caption ids, text-encoder
cache); "synthetic" is `Trainer.compute_step(d)` on one StepData prepared once and kept in
memory (compute, backward and optimizer step only). Blocks of the two alternate, so a
machine shared with other jobs slows both alike; the medians are compared.

    python bench/data_vs_synthetic.py [--resolution 256] [--batch 1] [--blocks 6] [--per-block 10]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import bench_common  # noqa: F401
import torch
from bench_common import make_dataset, median_ms, ready_trainer, table


def run(resolution: int, batch: int, blocks: int, per_block: int, train_te: bool, images: int = 35, te_cache: bool = True) -> dict:
    from lib_lora.config import TrainConfig
    from lib_lora.training import data as data_mod

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ds = make_dataset(work / "data", n_images=images, repeats=30, size=resolution)
        cfg = TrainConfig(
            name="dvs", dataset=str(ds), output_dir=str(work / "out"), run_dir=str(work / "run"), overwrite=True,
            resolution=resolution, batch_size=batch, optimizer="adamw", lr="1e-4", log_every_n_steps=10**6,
            train_text_encoder=train_te, cache_latents_to_disk=False, cache_text_encoder_outputs=te_cache,
        )  # fmt: skip
        tr = ready_trainer(cfg, name="dvs")
        try:
            total = 5 + blocks * per_block
            batches = iter(data_mod.iter_batches(tr.state.dataset.items, cfg, total, cfg.seed))
            first = next(batches)
            synth = tr.step_inputs(first)  # prepared once, reused: no data work at all
            for _ in range(4):
                tr.train_step(next(batches))
                tr.compute_step(synth)
            real_t, syn_t, real_c, syn_c = [], [], [], []
            for _ in range(blocks):
                for _ in range(per_block):
                    b = next(batches)
                    t0, c0 = time.perf_counter(), time.process_time()
                    tr.train_step(b)
                    real_t.append(time.perf_counter() - t0)
                    real_c.append(time.process_time() - c0)
                for _ in range(per_block):
                    t0, c0 = time.perf_counter(), time.process_time()
                    tr.compute_step(synth)
                    syn_t.append(time.perf_counter() - t0)
                    syn_c.append(time.process_time() - c0)
            # The data path alone, for the record.
            feed_t = []
            for _ in range(per_block):
                t0 = time.perf_counter()
                tr.step_inputs(first)
                feed_t.append(time.perf_counter() - t0)
        finally:
            tr.close()
    real, syn = median_ms(real_t), median_ms(syn_t)
    rc, sc = median_ms(real_c), median_ms(syn_c)
    return {
        "resolution": resolution, "batch": batch, "train_te": train_te,
        "te_cache": te_cache and not train_te, "steps_each": len(real_t),
        "real_ms": round(real, 2), "synthetic_ms": round(syn, 2), "diff_pct": round(100 * (real - syn) / syn, 2),
        "real_cpu_ms": round(rc, 2), "synthetic_cpu_ms": round(sc, 2), "cpu_diff_pct": round(100 * (rc - sc) / sc, 2),
        "feed_ms": round(median_ms(feed_t), 3),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, nargs="*", default=[256])
    ap.add_argument("--batch", type=int, nargs="*", default=[1])
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--per-block", type=int, default=10)
    ap.add_argument("--images", type=int, default=35)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# CPU {os.cpu_count()} cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for res in args.resolution:
        for b in args.batch:
            for te, cache in ((True, True), (False, True), (False, False)):
                rows.append(run(res, b, args.blocks, args.per_block, te, args.images, cache))
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows, list(rows[0])))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    worst = max(r["diff_pct"] for r in rows)
    worst_cpu = max(r["cpu_diff_pct"] for r in rows)
    print(f"# worst real-vs-synthetic difference: wall {worst:+.2f}%, CPU time {worst_cpu:+.2f}% (target: within 5%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
