"""The training folder's manifest.json: what each output came from and how it was made.

The tagging step reads `background` to set background tags; a re-run reads `items` to skip
unchanged images and to keep crops the user adjusted; the UI reads crop boxes to show them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lib_lora.atomic import atomic_write_json
from lib_lora.dataset.records import ImageRecord

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def manifest_path(train_dir: str | Path) -> Path:
    return Path(train_dir) / MANIFEST_NAME


def read_manifest(train_dir: str | Path) -> dict[str, Any] | None:
    """The manifest as a dict, or None when there is none (or it is unreadable: then we redo all)."""
    path = manifest_path(train_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        return None
    return data


def records_of(data: dict[str, Any] | None, train_dir: Path) -> dict[str, ImageRecord]:
    """The manifest's records keyed by source path."""
    if not data:
        return {}
    out = {}
    for item in data.get("items", []):
        try:
            rec = ImageRecord.from_json(item, train_dir)
        except (KeyError, TypeError, ValueError):
            continue
        out[str(rec.source)] = rec
    return out


def write_manifest(train_dir: Path, data: dict[str, Any]) -> Path:
    data = {"version": MANIFEST_VERSION, **{k: v for k, v in data.items() if k != "version"}}
    return atomic_write_json(manifest_path(train_dir), data)
