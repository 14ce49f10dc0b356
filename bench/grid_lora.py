"""What the Test tab's grid spends on the LoRA itself, apart from making the images.

    python bench/grid_lora.py [--dim 128] [--rows 2] [--weights 3] [--device cpu] [--tiny]

On an SD1.5-shaped model with random weights (or the tiny model with --tiny), a LoRA file of
rank --dim is written, then timed: reading it and building the network (what every cell paid
before the grid kept its networks), and one cell's reweight + apply + remove (what a cell pays
now). The last line is the LoRA set-up of a rows x weights grid, then and now.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import bench_common  # noqa: F401 - puts the checkout first on sys.path
import torch
from bench_common import median_ms, sd15_random_backbone

from lib_lora.hosts.standalone import LoadedLoras
from lib_lora.training.export import write_lora
from lib_lora.training.lora import LoRANetwork


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--weights", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="the tiny test model instead of SD1.5's shape")
    args = ap.parse_args()

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    if args.tiny:
        from lib_lora.training.models import load_backbone

        backbone = load_backbone("tiny", device=args.device, dtype=dtype)
    else:
        backbone = sd15_random_backbone(args.device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.safetensors"
        net = LoRANetwork(backbone.lora_targets(), dim=args.dim, alpha=args.dim / 2)
        write_lora(path, net.state_dict_kohya(), {"ss_output_name": "bench"})
        del net
        size_mb = path.stat().st_size / 1e6

        loads, cells = [], []
        for _ in range(args.repeat):
            networks = LoadedLoras(backbone)
            t = time.perf_counter()
            networks.network(path)
            loads.append(time.perf_counter() - t)
            for w in (0.0, 0.5, 1.0):
                t = time.perf_counter()
                with networks.applied([(path, w)]):
                    pass
                cells.append(time.perf_counter() - t)
    n = args.rows * args.weights
    load_ms, cell_ms = median_ms(loads), median_ms(cells)
    print(f"model: {'tiny' if args.tiny else 'SD1.5-shaped'} on {args.device}; LoRA rank {args.dim}, {size_mb:.0f} MB")
    print(f"read + build the network: {load_ms:.0f} ms; one cell's reweight + apply + remove: {cell_ms:.1f} ms")
    print(f"{args.rows}x{args.weights} grid, LoRA set-up: before {n * (load_ms + cell_ms) / 1000:.2f} s "
          f"(read per cell), now {(load_ms + n * cell_ms) / 1000:.2f} s")


if __name__ == "__main__":
    main()
