"""Writing and reading LoRA files in kohya's format, with the hashes readers expect.

`sshs_model_hash` is the sha256 of the bytes after the safetensors header of the file
serialised with only the `ss_*` metadata; `sshs_legacy_hash` the first 8 hex digits of the
sha256 of 0x10000 bytes at offset 0x100000 of that same serialisation (kohya, addnet).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

from lib_lora.atomic import atomic_path
from lib_lora.errors import UserError


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata)


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) for these tensors and metadata."""
    blob = _safetensors_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    (header_len,) = struct.unpack("<Q", blob[:8])
    model_hash = hashlib.sha256(blob[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def prepare_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """CPU, contiguous, in the save dtype; refuses non-finite weights (a broken LoRA is never saved)."""
    out = {}
    bad = []
    for k, v in tensors.items():
        t = v.detach().to("cpu", torch.float32)
        if not torch.isfinite(t).all():
            bad.append(k)
        out[k] = t.to(dtype).contiguous()
    if bad:
        raise UserError(
            f"The LoRA has non-finite weights (NaN/inf) in {len(bad)} tensors (e.g. {bad[0]}); it was not saved. "
            "Lower the learning rate or alpha, or use bf16 instead of fp16."
        )
    overflow = [k for k, v in out.items() if not torch.isfinite(v.float()).all()]
    if overflow:
        raise UserError(
            f"The LoRA's weights overflow {dtype} in {len(overflow)} tensors (e.g. {overflow[0]}), so it was not "
            "saved; lower the learning rate (weights this large usually mean training diverged), or save in fp32 "
            "or bf16: the same run resumes with the new save precision."
        )
    return out


def write_lora(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    overwrite: bool = False,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a kohya LoRA file atomically, adding the sshs hashes to the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; choose another name or allow overwriting.")
    tensors = prepare_tensors(tensors, dtype)
    meta = {k: str(v) for k, v in metadata.items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = addnet_hashes(tensors, meta)
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


def read_metadata(path: str | Path) -> dict[str, str]:
    """Only the header's metadata (cheap: reads the JSON header, no tensors)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return header.get("__metadata__", {})


def legacy_hash(path: str | Path) -> str:
    """kohya's `model_hash`: 8 hex of sha256 over 0x10000 bytes at 0x100000 of a file."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
