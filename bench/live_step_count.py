"""The Train tab's live step count: what one change of a number costs.

    python bench/live_step_count.py [--images 50] [--size 2048] [--keep DIR]

A dataset of --images PNGs of --size px (bench_common.make_dataset) is counted once (every
image's header is read, as training's scan does), then again after each of a few changes of
epochs, batch size and resolution (the tab remembers what it read; nothing is read). Prints the
seconds and the image headers read per call.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import bench_common  # noqa: F401 - puts the checkout first on sys.path
from bench_common import make_dataset, table

from lib_lora import config
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.training import data
from lib_lora.ui import forms, tab_train
from lib_lora.ui.context import UIContext

CHANGES = ({}, {"epochs": 2}, {"batch_size": 4}, {"resolution": 768}, {"epochs": 5, "batch_size": 2})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--keep", type=Path, help="make (or reuse) the dataset here instead of a temporary folder")
    args = ap.parse_args()

    read = [0]
    real = data.inspect

    def counting(path):  # the real header read, counted
        read[0] += 1
        return real(path)

    data.inspect = counting
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        ds = make_dataset(root / "ds", n_images=args.images, repeats=10, size=args.size)
        ctx = UIContext(host=StandaloneHost(output_dir=root / "loras", work_dir=root / "work", device="cpu"))
        names = [f.name for f in forms.fields(config.TrainConfig, skip=tab_train.SPECIAL)]
        form = tab_train.TrainForm(names, has_base_model=True)
        rows = []
        for change in CHANGES:
            values = dict(zip(names, forms.values_of(config.TrainConfig(), names), strict=True)) | change
            read[0] = 0
            t = time.perf_counter()
            text = tab_train.step_count(ctx, form, str(ds), [values[n] for n in names])
            rows.append({"change": ", ".join(f"{k}={v}" for k, v in change.items()) or "(first count)",
                         "seconds": f"{time.perf_counter() - t:.3f}", "headers read": read[0],
                         "shown": text.split(" = ")[0]})
    print(f"{args.images} images of {args.size}x{args.size} px")
    print(table(rows, ["change", "seconds", "headers read", "shown"]))


if __name__ == "__main__":
    main()
