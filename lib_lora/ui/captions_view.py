"""Reading a folder of images and their captions for display (the files are the truth)."""

from __future__ import annotations

from pathlib import Path

from lib_lora.imagefiles import list_images


def images_in(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return list_images(folder) if folder.is_dir() else []


def caption_of(image: Path, ext: str = ".txt") -> str:
    path = image.with_suffix(ext)
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace")
    return text.splitlines()[0].strip() if text.strip() else ""


def caption_rows(folder: str | Path) -> list[list[str]]:
    return [[p.name, caption_of(p)] for p in images_in(folder)]


def find_image_dir(folder: str | Path) -> Path:
    """A folder of images, or a training folder whose single <repeats>_<name> child holds them."""
    folder = Path(folder)
    if images_in(folder):
        return folder
    subs = [d for d in sorted(folder.iterdir()) if d.is_dir() and images_in(d)] if folder.is_dir() else []
    return subs[0] if len(subs) == 1 else folder
