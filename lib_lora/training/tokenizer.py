"""The CLIP tokenizer, offline.

SD1.5 uses OpenAI's CLIP BPE vocabulary. It ships inside open-clip-torch
(`bpe_simple_vocab_16e6.txt.gz`, present in every A1111 venv); we read that file without
importing open_clip (whose import needs torchvision) and build the transformers
CLIPTokenizer files from it the way OpenAI's tokenizer builds its vocabulary.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

from lib_lora.atomic import atomic_write_text
from lib_lora.errors import ModelLoadError
from lib_lora.training.family import SD15

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# OpenAI's tokenizer keeps the first 49152-256-2 merges of the file.
N_MERGES = 49152 - 256 - 2


def find_bpe_vocab() -> Path | None:
    """open-clip-torch's BPE vocabulary file, located without importing the package."""
    env = os.environ.get("FASTLORA_CLIP_BPE")
    if env and Path(env).is_file():
        return Path(env)
    spec = importlib.util.find_spec("open_clip")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / BPE_FILE
            if p.is_file():
                return p
    return None


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte <-> printable-unicode table: printable bytes map to themselves, the
    # rest to code points from 256 up, in byte order.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def build_vocab_files(bpe_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt for transformers' CLIPTokenizer from the BPE file."""
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : N_MERGES + 1]
    pairs = [tuple(m.split()) for m in merges]
    units = list(_bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    atomic_write_text(vocab_file, json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    atomic_write_text(merges_file, "#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    return vocab_file, merges_file


def cache_dir() -> Path:
    root = os.environ.get("FASTLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fast_lora")
    return Path(root)


# SDXL's second text encoder (OpenCLIP ViT-bigG/14) was trained on ids padded with 0, the id
# of "!" in the CLIP vocabulary (open_clip's tokenizer pads with 0); kohya forces it too
# (sd-scripts library/sdxl_train_util.py load_tokenizers: `tokenizer.pad_token_id = 0`).
TE2_PAD_TOKEN = "!"


@lru_cache(maxsize=4)
def load_clip_tokenizer(folder: Path | None = None, pad_token: str | None = None):
    """A CLIPTokenizer: from a diffusers/transformers tokenizer folder, else from the BPE file.

    `pad_token` overrides the padding token (None: the folder's own, else end-of-text)."""
    from transformers import CLIPTokenizer

    if folder is not None:
        extra = {"pad_token": pad_token} if pad_token is not None else {}
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)
    bpe = find_bpe_vocab()
    if bpe is None:
        raise ModelLoadError(
            f"The CLIP tokenizer vocabulary ({BPE_FILE}) was not found. Install it with "
            "'pip install --no-deps open-clip-torch==2.20.0', or set FASTLORA_CLIP_BPE to the file."
        )
    out = cache_dir() / "clip_tokenizer"
    vocab_file, merges_file = out / "vocab.json", out / "merges.txt"
    if not (vocab_file.is_file() and merges_file.is_file()):
        out.mkdir(parents=True, exist_ok=True)
        build_vocab_files(bpe, out)
    return CLIPTokenizer(
        str(vocab_file),
        str(merges_file),
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token=pad_token or "<|endoftext|>",
        model_max_length=SD15.chunk_length,  # CLIP's context, the same for every family's encoders
    )


def load_clip_tokenizer_2(folder: Path | None = None):
    """SDXL's second tokenizer: CLIP's BPE vocabulary, padding with "!" (id 0)."""
    return load_clip_tokenizer(folder, pad_token=TE2_PAD_TOKEN)
