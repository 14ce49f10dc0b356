"""One LoRA-wrapped Linear layer, forward + backward: `lora.LoRAModule`'s form (down, scale on
the rank-wide hidden, up, add) against two fused forms of the up projection and the add
(`torch.addmm` out of place, and `addmm_` into the base output in place).

Shapes are SD1.5's at 512² (tokens x channels of the U-Net's attention and feed-forward layers,
and the text encoder's 77 tokens); rank 128 as in the seed recipe. Prints a table; JSON too.

    python bench/lora_layer.py --threads 1                   # CPU, fp32, tokens / 4
    python bench/lora_layer.py --device cuda --dtype fp16    # GPU under autocast
"""

from __future__ import annotations

import argparse
import json
import time

import bench_common  # noqa: F401 - puts the checkout first on sys.path
import torch
from bench_common import median_ms, table
from torch import nn

from lib_lora.training.lora import LoRAModule

# (label, tokens, in_features, out_features): one of each kind of LoRA target at 512².
SHAPES = [
    ("down0 attn q/k/v/out", 4096, 320, 320),
    ("down0 ff in (GEGLU)", 4096, 320, 2560),
    ("down0 ff out", 4096, 1280, 320),
    ("down1 attn", 1024, 640, 640),
    ("down2 attn", 256, 1280, 1280),
    ("mid attn", 64, 1280, 1280),
    ("cross-attn k/v", 77, 768, 320),
    ("text encoder mlp fc1", 77, 768, 3072),
]


class AddmmUp(LoRAModule):
    """base + scale * h @ up^T as one addmm (copy of the base output, then a beta=1 GEMM)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self._org_forward(x, *args, **kwargs)
        h = self.lora_down(x if torch.is_autocast_enabled() else x.to(self.lora_down.weight.dtype))
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_up.weight.t(),
                           alpha=self.multiplier * self.scale)  # fmt: skip
        return flat.view(out.shape)


class AddmmInPlace(LoRAModule):
    """The up GEMM accumulating into the base output in place (no delta tensor, no add pass);
    autograd allows it because the base layer's backward keeps its input, not its output."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self._org_forward(x, *args, **kwargs)
        h = self.lora_down(x if torch.is_autocast_enabled() else x.to(self.lora_down.weight.dtype))
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.lora_up.weight.t(),
                                           alpha=self.multiplier * self.scale)  # fmt: skip
        return out


# The form lora.py uses first; the table gives each other form's change against it.
FORMS = {"lora.py": LoRAModule, "addmm": AddmmUp, "addmm_ in place": AddmmInPlace}


def time_layer(cls: type[LoRAModule], tokens: int, fin: int, fout: int, rank: int, device: str,
               amp: torch.dtype | None, steps: int, warmup: int) -> float:  # fmt: skip
    base = nn.Linear(fin, fout).to(device, amp or torch.float32).requires_grad_(False)
    lora = cls("bench", base, rank, rank / 2).to(device)
    nn.init.normal_(lora.lora_up.weight, std=0.01)  # a trained-looking up weight, not zeros
    lora.apply_to()
    x = torch.randn(1, tokens, fin, device=device, dtype=amp or torch.float32, requires_grad=True)
    grad = torch.randn(1, tokens, fout, device=device, dtype=amp or torch.float32)
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            y = base(x)
        y.backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        x.grad = lora.lora_down.weight.grad = lora.lora_up.weight.grad = None
    return median_ms(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="autocast dtype (fp32: none)")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--token-divisor", type=int, default=None, help="divide token counts (default 4 on the CPU, 1 on GPU)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    div = args.token_divisor or (4 if args.device == "cpu" else 1)
    rows = []
    for label, tokens, fin, fout in SHAPES:
        n = max(1, tokens // div) if tokens > 77 else tokens
        # Alternate the forms so load drift on a shared machine hits them alike; median of 3 rounds.
        ms: dict[str, list[float]] = {k: [] for k in FORMS}
        for _ in range(3):
            for k, cls in FORMS.items():
                ms[k].append(time_layer(cls, n, fin, fout, args.rank, args.device, amp, args.steps, args.warmup))
        med = {k: sorted(v)[1] for k, v in ms.items()}
        row = {"layer": label, "tokens": n, "in": fin, "out": fout, "lora.py ms": round(med["lora.py"], 3)}
        for k in list(FORMS)[1:]:
            row[k] = f"{(med[k] / med['lora.py'] - 1) * 100:+.1f} %"
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n# {args.device}, {args.dtype}, rank {args.rank}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); forward + backward of base + LoRA, median of {args.steps}")  # fmt: skip
    print(table(rows, list(rows[0])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
