"""Shared helpers of the reliability tests: a tiny dataset and a fast tiny-model config."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from lib_lora.config import TrainConfig


def make_dataset(root: Path, n: int = 3, size: int = 64) -> Path:
    sub = root / "5_tok"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(sub / f"img{i}.png")
        (sub / f"img{i}.txt").write_text(f"tok, tag{i}, red, blue, green", encoding="utf-8")
    return root


def tiny_config(tmp: Path, dataset: Path, name: str = "rel", **kw) -> TrainConfig:
    base = dict(
        name=name, dataset=str(dataset), base_model="tiny", output_dir=str(tmp / "out"),
        run_dir=str(tmp / "runs" / name), resolution=64, min_bucket_reso=64, max_bucket_reso=128,
        dim=4, alpha=2.0, optimizer="adamw", lr="1e-3", lr_scheduler="cosine", lr_warmup_steps=2,
        max_steps=12, seed=7, log_every_n_steps=1, shuffle_caption=True, network_dropout=0.1,
        state_every_n_steps=0, device="cpu", save_precision="fp32",
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


DEV_FULL = Path("/dev/full")  # Linux: every write to it fails with ENOSPC, as on a full disk


def full_disk(writer, nbytes: int = 4096):
    """`writer(obj, path, ...)` on a disk that fills up: `nbytes` reach the file, then the real
    writer meets the kernel's ENOSPC (it writes to /dev/full) and raises what it raises on a
    full disk (torch: a RuntimeError from inline_container.cc; safetensors: SafetensorError)."""

    def write(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"\0" * nbytes)
        return writer(obj, str(DEV_FULL), *a, **k)

    return write


def patch_torch_save(monkeypatch, fn) -> None:
    """`torch.save` replaced by `fn` for one test. transformers' and diffusers' `save_pretrained`
    take `torch.save` as a default argument, bound when their module is first imported: import
    them first, or a later test's model save would still meet the full disk."""
    import diffusers.models.modeling_utils  # noqa: F401
    import torch
    import transformers.modeling_utils  # noqa: F401

    monkeypatch.setattr(torch, "save", fn)


def tensor_bytes(path: Path) -> bytes:
    """The bytes after a safetensors file's header: the tensors, exactly as stored."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 + n:]


def header(path: Path) -> dict:
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha(p) for p in sorted(Path(root).rglob("*")) if p.is_file()}
