"""Which files are images: one answer for prepare, tagging, training and the UI.

Every step lists a folder through here, so an image the tagger captions is one the trainer
trains on and the UI shows. No third-party imports: any module may use it.
"""

from __future__ import annotations

from pathlib import Path

# What Pillow reads without plugins (lib_lora.dataset.images decodes them all).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff",
                              ".gif"})  # fmt: skip
# Image formats users do drop in a folder that we cannot read: reported, not silently ignored.
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset({".heic", ".heif", ".avif", ".jxl", ".psd", ".svg", ".raw", ".cr2", ".cr3",
                                          ".nef", ".arw", ".dng", ".orf", ".rw2", ".ico", ".jp2"})  # fmt: skip


def is_image_name(path: Path) -> bool:
    """An image by its name: a supported extension, and not hidden (.DS_Store, ._photo.jpg from macOS)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted."""
    return sorted(p for p in Path(folder).iterdir() if is_image_name(p) and p.is_file())
