"""File hashes (exact duplicates, manifest) and perceptual hashes (near duplicates)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

NEAR_DUPLICATE_BITS = 6  # Hamming distance between 64-bit pHashes that counts as "near duplicate"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def phash(gray: np.ndarray) -> str:
    """64-bit DCT perceptual hash of a grayscale image, as 16 hex digits.

    Survives re-encoding, resizing and mild colour changes, so two exports of the same photo
    match while different photos of the same person do not.
    """
    small = cv2.resize(gray.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term would dominate the median
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"
