"""By hand: write a single-file SDXL base checkpoint with random weights and SDXL base's real shapes.

    python tests/webui/tools/make_sdxl_shaped_checkpoint.py <out.safetensors> [--seed N] [--check]

For starting a real WebUI (Forge, A1111) on SDXL where no model hub can be reached: a host
detects SDXL base from the state dict's shapes (Forge through huggingface_guess: 320 model
channels, transformer depth [0, 2, 10] per level, a 2048-wide cross-attention, a 2816-wide adm
input), so tiny-sdxl is not taken for SDXL but this file is. The layout and values are
`tiny_model.random_single_file("sdxl", full_size=True)`'s, in fp16: diffusers' U-Net / VAE and
transformers' CLIP text models with SDXL base's configs (tiny_model.SDXL_*), every weight drawn
from its own generator seeded by the seed and its name, in the sgm names (model.diffusion_model.*,
first_stage_model.*, conditioner.embedders.0.transformer.text_model.* (CLIP ViT-L),
conditioner.embedders.1.model.* (OpenCLIP ViT-bigG: transformer.resblocks.N.attn.in_proj_weight,
text_projection, ...)).

Why not random_single_file + save_file: the model has 3.5 B values (14 GB in fp32) and
safetensors' save_file copies every tensor to bytes once more. Here the header comes from the
shapes alone (meta tensors through the same layout functions) and each part (U-Net, VAE, TE1,
TE2) is drawn in fp16, converted and written in turn, so the peak is the fp16 U-Net (5.2 GB).
`--check` then reads the header back and asks Forge's huggingface_guess (when importable) which
model it is. Not part of the test suite (a 6.9 GB file).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

_DTYPES = {torch.float16: ("F16", 2), torch.int64: ("I64", 8), torch.float32: ("F32", 4)}


def _parts(seed: int, meta: bool) -> list[tuple[str, Callable[[], dict[str, torch.Tensor]]]]:
    """(name, builder) per part; each builder gives that part's sgm keys and fp16 values (meta:
    shapes only, no memory), in the order they go into the file."""
    from lib_lora.training.checkpoint_layout import (
        SDXL_PREFIXES,
        _prefixed,
        clip_to_open_clip,
        unet_to_compvis,
        vae_to_compvis,
    )
    from lib_lora.training.tiny_model import _position_ids, build_sdxl_modules, draw_weight

    unet, vae, te1, te2 = build_sdxl_modules(full_size=True)

    def values(module: torch.nn.Module, scope: str) -> dict[str, torch.Tensor]:
        # random_state_dict's draws, one tensor at a time to fp16 (it keeps all in fp32)
        out = {}
        for key, param in module.named_parameters():
            if meta:
                out[key] = torch.empty(param.shape, dtype=torch.float16, device="meta")
            else:
                out[key] = draw_weight(f"{scope}.{key}", param.shape, seed).to(torch.float16)
        return out

    def te1_part() -> dict[str, torch.Tensor]:
        sd = _prefixed(SDXL_PREFIXES["te1"], values(te1, "te1"))
        sd[SDXL_PREFIXES["te1"] + "text_model.embeddings.position_ids"] = _position_ids(te1.config)
        return sd

    def te2_part() -> dict[str, torch.Tensor]:
        sd = clip_to_open_clip(values(te2, "te2"))
        sd["logit_scale"] = sd["logit_scale"].to(torch.float16)  # as in a downloaded fp16 file
        return _prefixed(SDXL_PREFIXES["te2"], sd)

    return [
        ("unet", lambda: _prefixed(SDXL_PREFIXES["unet"], unet_to_compvis(values(unet, "unet"), unet.config))),
        ("vae", lambda: _prefixed(SDXL_PREFIXES["vae"], vae_to_compvis(values(vae, "vae")))),
        ("te1", te1_part),
        ("te2", te2_part),
    ]


def _header(parts: list[Mapping[str, torch.Tensor]], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    header: dict[str, object] = {"__metadata__": metadata}
    order, offset = [], 0
    for part in parts:
        for key, t in part.items():
            name, size = _DTYPES[t.dtype]
            end = offset + t.numel() * size
            header[key] = {"dtype": name, "shape": list(t.shape), "data_offsets": [offset, end]}
            order.append(key)
            offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw, order


def write(out: Path, seed: int) -> tuple[int, int]:
    """Write the file; (tensors, values)."""
    from lib_lora.atomic import atomic_path

    shapes = [build() for _, build in _parts(seed, meta=True)]
    head, order = _header(shapes, {"fastlora_random_sdxl": f"seed {seed}"})
    expected = {k: (tuple(t.shape), t.dtype) for part in shapes for k, t in part.items()}
    count = sum(t.numel() for part in shapes for t in part.values())
    written: list[str] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        f.write(head)
        for name, build in _parts(seed, meta=False):
            part = build()
            for key, t in part.items():
                if (tuple(t.shape), t.dtype) != expected[key]:
                    raise RuntimeError(f"{key}: drawn {tuple(t.shape)} {t.dtype}, header says {expected[key]}")
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))  # 0-dim: logit_scale
                written.append(key)
            print(f"  {name}: {len(part)} tensors, {sum(t.numel() for t in part.values()) / 1e6:.0f}M values",
                  flush=True)
            del part
    if written != order:
        raise RuntimeError("the parts were written in another order than the header's")
    return len(order), count


def check(path: Path) -> str:
    """The header's keys read back (meta tensors) and, if importable, huggingface_guess's answer."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    names = {v: k for k, (v, _) in _DTYPES.items()}
    sd = {k: torch.empty(v["shape"], dtype=names[v["dtype"]], device="meta")
          for k, v in header.items() if k != "__metadata__"}
    last = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    if path.stat().st_size != 8 + size + last:
        raise RuntimeError(f"{path}: {path.stat().st_size} bytes, the header indexes {8 + size + last}")
    try:
        import huggingface_guess
    except ImportError:
        return f"{len(sd)} tensors; huggingface_guess not importable here"
    guess = huggingface_guess.guess(sd)
    return f"{len(sd)} tensors; huggingface_guess: {type(guess).__name__} ({guess.huggingface_repo})"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--check", action="store_true", help="only read the file back (and ask huggingface_guess)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root: lib_lora
    if not args.check:
        tensors, count = write(args.out, args.seed)
        print(f"wrote {args.out}: {tensors} tensors, {count / 1e6:.0f}M values, fp16")
    print(check(args.out))
    return args.out


if __name__ == "__main__":
    main()
