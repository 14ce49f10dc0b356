"""The training data path's reads: file opens, pixel decodes and seconds of the dataset scan
and of latent caching (the tiny model's VAE, so decoding is what is measured), cold and from
the disk cache.

    python bench/data_reads.py [--images 20] [--size 2048] [--resolution 512]

Prints a table. Opens and decodes are exact counts; the seconds are CPU seconds of this
process (a busy machine distorts them less than wall time) and include the tiny VAE's encode.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench_common import make_dataset, table
from PIL import ImageFile

OPENED: list[str] = []
DECODED: list[int] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], str) and args[0].endswith(".png"):
        OPENED.append(args[0])


def _count_decodes() -> None:
    real = ImageFile.ImageFile.load

    def load(self):  # Pillow's own load, counted when pixel data is still to decode
        if self.tile:
            DECODED.append(1)
        return real(self)

    ImageFile.ImageFile.load = load


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(label: str, fn: Callable[[], object], n: int) -> dict:
    OPENED.clear()
    DECODED.clear()
    t0 = _cpu()
    fn()
    return {"phase": label, "opens/image": round(len(OPENED) / n, 2), "decodes/image": round(len(DECODED) / n, 2),
            "cpu s": round(_cpu() - t0, 2)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--size", type=int, default=2048, help="side of the square PNGs")
    ap.add_argument("--resolution", type=int, default=512)
    args = ap.parse_args()

    from lib_lora.config import TrainConfig
    from lib_lora.training import data
    from lib_lora.training.models import load_backbone

    sys.addaudithook(_audit)
    _count_decodes()
    bb = load_backbone("tiny", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(tmp) / "ds", n_images=args.images, size=args.size)
        cfg = TrainConfig(resolution=args.resolution)
        cache = Path(tmp) / "cache"
        box: dict = {}
        n = args.images
        rows = [
            measure("scan", lambda: box.setdefault("items", data.scan_dataset(root, cfg).items), n),
            measure("cache latents (cold)", lambda: data.cache_latents(list(box["items"]), bb, cache), n),
            measure("cache latents (on disk)", lambda: data.cache_latents(list(box["items"]), bb, cache), n),
        ]
    print(f"{args.images} PNGs of {args.size}x{args.size}, trained at {args.resolution}")
    print(table(rows, ["phase", "opens/image", "decodes/image", "cpu s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
