"""Buckets are chosen as kohya's sd-scripts chooses them, checked against a committed table.

The table (tests/fixtures/kohya_buckets_512.json) holds the bucket of every size from 256 to
2048 px in steps of 16 at resolution 512 (bucket step 64, buckets 256..1024), with and without
upscaling. It was written by `reference_bucket` below, a plain statement of kohya's rule kept
apart from lib_lora's code; regenerate it with
`python tests/training/test_kohya_buckets.py > tests/fixtures/kohya_buckets_512.json`.

kohya's rule (BucketManager.select_bucket, make_bucket_resolutions):
- no upscale: an image within the training area keeps its size, each side floored to the step.
  A larger one is scaled to the area keeping its aspect ratio; then either its width is snapped
  (rounded to a pixel, then down to the step) and the height follows from the aspect ratio,
  snapped the same way, or the height first and the width follows. The way whose bucket's
  aspect ratio is nearer the image's is taken, the height-first way on a tie.
- upscale: the predefined buckets are the square of the area and, for every width from the
  smallest to the largest bucket side in steps, the tallest height within the area (capped at
  the largest side), and its mirror. An image whose exact size is a bucket takes it; otherwise
  the bucket of the nearest aspect ratio, the first in (width, height) order among equals.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lib_lora.config import TrainConfig
from lib_lora.training import data

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kohya_buckets_512.json"
RESOLUTION, STEP, LO, HI = 512, 64, 256, 1024
GRID = range(256, 2048 + 1, 16)


def reference_bucket(w: int, h: int, upscale: bool) -> tuple[int, int] | None:
    area = RESOLUTION * RESOLUTION
    aspect = w / h
    if upscale:
        square = math.isqrt(area) // STEP * STEP
        resos = {(square, square)}
        for bw in range(LO, HI + 1, STEP):
            bh = min(HI, area // bw // STEP * STEP)
            if bh >= LO:
                resos |= {(bw, bh), (bh, bw)}
        ordered = sorted(resos)
        if (w, h) in resos:
            return (w, h)
        errors = [abs(bw / bh - aspect) for bw, bh in ordered]
        return ordered[errors.index(min(errors))]
    if w * h <= area:
        b = (w - w % STEP, h - h % STEP)
        return b if b[0] > 0 and b[1] > 0 else None

    def snap(v: float) -> int:
        px = math.floor(v + 0.5)
        return px - px % STEP

    scaled_w = math.sqrt(area * aspect)
    scaled_h = area / scaled_w
    height_first_h = snap(scaled_h)
    height_first = (snap(height_first_h * aspect), height_first_h)
    width_first_w = snap(scaled_w)
    width_first = (width_first_w, snap(width_first_w / aspect))
    usable = [b for b in (height_first, width_first) if b[0] > 0 and b[1] > 0]
    if not usable:
        return None
    return sorted(usable, key=lambda b: abs(b[0] / b[1] - aspect))[0]  # sorted is stable: height first on a tie


def build_table() -> dict:
    table: dict = {
        "about": "kohya sd-scripts bucket of each (width, height); rows by width, columns by height, "
                 "each entry an index into 'buckets' (-1: too small)",
        "resolution": RESOLUTION, "bucket_reso_steps": STEP, "min_bucket_reso": LO, "max_bucket_reso": HI,
        "sizes": [GRID.start, GRID.stop - 1, GRID.step],
    }
    buckets: list[str] = []
    for mode, upscale in (("no_upscale", False), ("upscale", True)):
        rows = {}
        for w in GRID:
            cells = []
            for h in GRID:
                b = reference_bucket(w, h, upscale)
                key = "" if b is None else f"{b[0]}x{b[1]}"
                if key and key not in buckets:
                    buckets.append(key)
                cells.append(str(buckets.index(key)) if key else "-1")
            rows[str(w)] = " ".join(cells)
        table[mode] = rows
    table["buckets"] = buckets
    return table


def expected(table: dict, mode: str) -> dict[tuple[int, int], tuple[int, int] | None]:
    out = {}
    for w in GRID:
        for h, idx in zip(GRID, table[mode][str(w)].split(), strict=True):
            i = int(idx)
            out[(w, h)] = None if i < 0 else tuple(int(x) for x in table["buckets"][i].split("x"))
    return out


@pytest.fixture(scope="module")
def table() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def test_the_table_is_the_rule(table):
    assert table == build_table()


@pytest.mark.parametrize("mode", ["no_upscale", "upscale"])
def test_buckets_match_kohya_over_the_grid(table, mode):
    cfg = TrainConfig(resolution=RESOLUTION, bucket_reso_steps=STEP, min_bucket_reso=LO, max_bucket_reso=HI,
                      bucket_no_upscale=mode == "no_upscale")
    want = expected(table, mode)
    wrong = {size: (data.choose_bucket(size, cfg), b) for size, b in want.items() if data.choose_bucket(size, cfg) != b}
    assert not wrong, f"{len(wrong)} of {len(want)} sizes differ, e.g. {list(wrong.items())[:5]}"


def test_common_photos_keep_the_whole_frame(table):
    # 4:3 and 4:5 photos: kohya's bucket has the photo's own aspect ratio, so nothing is cropped
    # beyond the step's rounding (the old rule gave 576x384 and 448x512, cropping ~10 %).
    cfg = TrainConfig(resolution=512)
    assert cfg.bucket_no_upscale
    want = expected(table, "no_upscale")
    assert data.choose_bucket((1024, 768), cfg) == want[(1024, 768)] == (512, 384)
    assert data.choose_bucket((1080, 1350), cfg) == reference_bucket(1080, 1350, False) == (384, 512)  # off the grid


if __name__ == "__main__":
    print(json.dumps(build_table(), indent=1))
