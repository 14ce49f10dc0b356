"""What the prepare step says about each image; stored in the manifest, shown by the UI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Box = tuple[int, int, int, int]


@dataclass
class ImageRecord:
    source: Path
    output: Path | None = None
    status: str = "ok"  # 'ok' | 'warning' | 'skipped'
    message: str = ""  # one line; empty when there is nothing to say
    crop_box: Box | None = None  # (x0, y0, x1, y1) in oriented, full-resolution source pixels
    face_box: Box | None = None  # the main face, same coordinates; None when none was found
    crop_mode: str = ""  # face | focal | center | bucket | none | manual
    source_sha256: str = ""
    output_sha256: str = ""
    source_size: tuple[int, int] | None = None  # oriented, full resolution
    output_size: tuple[int, int] | None = None
    background_model: str | None = None  # the model spec, 'source alpha', or None
    background_removed: bool = False
    mask: Path | None = None
    phash: str = ""
    duplicate_of: Path | None = None
    notes: list[str] = field(default_factory=list)
    cpu_seconds: float = 0.0  # CPU time this image took in its worker (all its threads)
    unchanged: bool = False  # reused from an earlier run (not written in the manifest)

    @property
    def kept(self) -> bool:
        return self.status != "skipped" and self.output is not None

    def line(self) -> str:
        """One line for the summary: name, then what happened."""
        return f"{self.source.name}: {self.message}" if self.message else self.source.name

    def to_json(self, train_dir: Path) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("unchanged")
        data["source"] = str(self.source)
        for key in ("output", "mask"):
            value = getattr(self, key)
            data[key] = _rel(value, train_dir) if value is not None else None
        data["duplicate_of"] = str(self.duplicate_of) if self.duplicate_of else None
        for key in ("crop_box", "face_box", "source_size", "output_size"):
            data[key] = list(data[key]) if data[key] is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], train_dir: Path) -> ImageRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        kw["source"] = Path(kw["source"])
        for key in ("output", "mask"):
            kw[key] = (train_dir / kw[key]) if kw.get(key) else None
        kw["duplicate_of"] = Path(kw["duplicate_of"]) if kw.get("duplicate_of") else None
        for key in ("crop_box", "face_box", "source_size", "output_size"):
            kw[key] = tuple(kw[key]) if kw.get(key) is not None else None
        return cls(**kw)


def _rel(path: Path, base: Path) -> str:
    try:
        return Path(path).relative_to(base).as_posix()
    except ValueError:
        return str(path)
