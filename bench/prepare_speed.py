"""Prepare-step speed: generated 3000x2000 JPEGs through import + face crop + resize + save.

    python bench/prepare_speed.py [--images 35] [--workers 1 2] [--keep DIR]

Each photo is a real face (scikit-image's astronaut, scaled 800-1400 px, so a head-and-shoulders shot) on a grainy
gradient, saved as a quality-90 JPEG. Prints a table of images per second, wall time
included (process-pool start-up counts: that is what a user waits for), and the CPU
seconds spent per image (parent + workers), which a busy machine distorts much less.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_lora.config import PrepareConfig  # noqa: E402
from lib_lora.dataset.prepare import prepare_dataset  # noqa: E402

TINY_MODEL = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny_bg_model.onnx"


def make_photos(folder: Path, n: int, seed: int = 0) -> None:
    from skimage import data

    rng = np.random.default_rng(seed)
    face = Image.fromarray(data.astronaut())
    yy, xx = np.mgrid[0:2000, 0:3000].astype(np.float32)
    for i in range(n):
        base = (xx[..., None] * rng.uniform(0.02, 0.06, 3).astype(np.float32)
                + yy[..., None] * rng.uniform(0.02, 0.06, 3).astype(np.float32))
        noise = rng.standard_normal((2000, 3000, 3), dtype=np.float32) * 6  # sensor-like grain
        img = Image.fromarray(np.clip(base + 60 + noise, 0, 255).astype(np.uint8))
        side = int(rng.integers(800, 1400))
        x, y = int(rng.integers(0, 3000 - side)), int(rng.integers(0, 2000 - side))
        img.paste(face.resize((side, side)), (x, y))
        img.save(folder / f"photo_{i:03d}.jpg", quality=90)


def _cpu() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def run(src: Path, work: Path, workers: int, remove_bg: str) -> tuple[float, float, int, int]:
    cfg = PrepareConfig(name=f"bench_{workers}_{remove_bg != 'none'}", out=str(work), workers=workers,
                        remove_bg=remove_bg, download=False)
    t, c = time.perf_counter(), _cpu()
    report = prepare_dataset(src, cfg)
    wall, parent_cpu = time.perf_counter() - t, _cpu() - c
    # Workers are the forkserver's children, not ours: they report their own CPU per image.
    worker_cpu = sum(r.cpu_seconds for r in report.items) if workers > 1 else 0.0
    return wall, parent_cpu + worker_cpu, len(report.kept), report.faces_found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=35)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--keep", help="keep the generated photos and outputs in this folder")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="prepare_bench_"))
    src = root / "photos"
    src.mkdir(parents=True, exist_ok=True)
    if len(list(src.glob("*.jpg"))) != args.images:
        t = time.perf_counter()
        make_photos(src, args.images)
        print(f"generated {args.images} photos in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    print(f"cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}, images: {args.images} x "
          "3000x2000 JPEG, output 512x512 PNG")
    print(f"| {'pipeline':<34} | workers | seconds | images/s | CPU s/image | faces |")
    print(f"|{'-' * 36}|---------|---------|----------|-------------|-------|")
    for remove_bg, label in (("none", "import + face crop + resize + save"),
                             (str(TINY_MODEL), "... + rembg (tiny u2net_custom)")):
        for w in args.workers:
            work = root / f"work_{w}_{remove_bg != 'none'}"
            if work.exists():
                import shutil

                shutil.rmtree(work)
            secs, cpu, kept, faces = run(src, work, w, remove_bg)
            print(f"| {label:<34} | {w:>7} | {secs:7.2f} | {kept / secs:8.1f} | {cpu / kept:11.3f} | {faces:>5} |")


if __name__ == "__main__":
    main()
