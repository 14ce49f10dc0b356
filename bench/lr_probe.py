"""How long the LR probe takes: probe steps until settled, seconds, the value found.

    python bench/lr_probe.py                      # tiny model on the CPU (a smoke run)
    python bench/lr_probe.py --model sd15-random --device cuda --resolution 512

`sd15-random` is a full-size SD1.5-shaped model with random weights (from the bundled configs),
so the *time* per probe step is real; the *value* found on random weights is not a value
for a trained SD1.5 checkpoint. Prints one table row per run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import sd15_random_backbone  # noqa: E402


def main() -> int:
    import numpy as np
    import torch
    from PIL import Image

    from lib_lora.config import TrainConfig
    from lib_lora.training import probe
    from lib_lora.training.run import Trainer

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=["tiny", "sd15-random"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1050, help="planned run length (the budget is a fraction of it)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--mixed-precision", default="no")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lr_probe_bench_"))
    sub = tmp / "data" / "30_person"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(args.images):
        img = rng.integers(0, 255, (args.resolution, args.resolution, 3), dtype=np.uint8)
        Image.fromarray(img).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(f"person, photo {i}", encoding="utf-8")
    cfg = TrainConfig(
        name="bench", dataset=str(tmp / "data"), output_dir=str(tmp / "out"), run_dir=str(tmp / "run"),
        resolution=args.resolution, dim=args.dim, alpha=args.dim / 2, max_steps=args.steps, lr="auto",
        device=args.device, mixed_precision=args.mixed_precision, cache_latents_to_disk=False,
    )  # fmt: skip
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    t0 = time.time()
    bb = sd15_random_backbone(args.device, dtype) if args.model == "sd15-random" else None
    tr = Trainer(cfg, backbone=bb)
    tr.state.started_at, tr.state.name = time.time(), cfg.name
    tr.load_all(optimizer=False)
    setup = time.time() - t0
    result, _ = probe.run_probe(tr.state, tr.cfg, tr.events, tr.build_optimizer, tr.train_step)
    tr.close()
    print("| model | device | res | dim | budget | probe steps | settled | probe s | s/step | d*lr found | setup s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {args.device} | {args.resolution} | {args.dim} | {result.budget} | {result.steps} | "
        f"{result.settled} | {result.seconds:.1f} | {result.seconds / result.steps:.3f} | {result.lr:.3g} | {setup:.1f} |"
    )
    print(f"plot: {result.plot_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
