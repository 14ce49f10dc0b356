"""Memory a finished job leaves behind: RSS before and after each of a few trainings run one
after another in one process, the way the UI runs them (StandaloneHost + the UI's JobRunner,
the base model loaded once and kept, as in the WebUI).

    python bench/job_rss.py [--jobs 3] [--images 16] [--size 256] [--steps 10] [--dim 32]

Columns: RSS before the job, at its end (peak of the samples taken while it ran), after it
(gc done), the growth over the first job's "before", and what is still alive after the job:
torch tensors (MB, the base model's weights included) and Trainer / optimizer / LoRA network
objects (0 means the job let go of them).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import threading
import time
from pathlib import Path

import bench_common  # noqa: F401 - puts the checkout's lib_lora first on sys.path
from bench_common import make_dataset, table


def rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as fh:
        pages = int(fh.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_objects() -> tuple[float, int]:
    """(MB of live torch tensors, number of live Trainer/optimizer/LoRANetwork objects)."""
    import torch

    from lib_lora.training.lora import LoRANetwork
    from lib_lora.training.run import Trainer

    gc.collect()
    tensor_bytes, seen, held = 0, set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, Trainer | torch.optim.Optimizer | LoRANetwork):
            held += 1
        elif torch.is_tensor(obj) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                tensor_bytes += storage.nbytes()
    return tensor_bytes / 2**20, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="image side and training resolution")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--base-model", default="tiny")
    args = ap.parse_args()

    import torch

    from lib_lora.config import TrainConfig
    from lib_lora.hosts.standalone import StandaloneHost
    from lib_lora.training.run import train
    from lib_lora.ui.jobs import JobRunner

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="job_rss_"))
    dataset = make_dataset(tmp / "data", n_images=args.images, repeats=1, size=args.size)
    host = StandaloneHost(base_model=args.base_model, output_dir=tmp / "out", work_dir=tmp / "work", device="cpu")
    runner = JobRunner(host.job)
    host.backbone()  # the model stays loaded between jobs, as in the WebUI: not part of a job's growth
    gc.collect()
    rows, first = [], None
    for i in range(args.jobs):
        cfg = TrainConfig(name=f"rss{i}", dataset=str(dataset), base_model=args.base_model, output_dir=str(tmp / "out"),
                          resolution=args.size, enable_buckets=False, dim=args.dim, alpha=args.dim / 2,
                          optimizer="adamw", lr="1e-4", max_steps=args.steps, device="cpu", mixed_precision="no",
                          cache_latents_to_disk=False, run_dir=str(tmp / "work" / "runs" / f"rss{i}"))

        def work(p, cfg=cfg):
            result = train(cfg, backbone=host.backbone(), progress=p, on_event=p.event)
            host.after_save(Path(result.lora_path), p)
            return result

        gc.collect()
        before = rss_mb()
        first = before if first is None else first
        peak = [before]
        job = runner.start("Train", work)
        while not job.finished.wait(0.05):
            peak.append(rss_mb())
        if job.error:
            raise SystemExit(job.error)
        t0 = time.perf_counter()
        tensors, held = live_objects()
        after = rss_mb()
        rows.append({"job": i + 1, "before_MB": round(before), "peak_MB": round(max(peak)), "after_MB": round(after),
                     "growth_MB": round(after - first), "live_tensors_MB": round(tensors, 1), "held_objects": held,
                     "gc_s": round(time.perf_counter() - t0, 2)})
    print(f"{args.jobs} trainings, {args.images} images at {args.size}², {args.steps} steps, dim {args.dim}, "
          f"{args.base_model} model, torch {torch.__version__}, {threading.active_count()} threads")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
