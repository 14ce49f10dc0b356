"""Loss masks for `masked_loss`: which part of each image the loss counts.

A mask is the grey-scale file `prepare` writes into `<dataset>/masks/` when it removes
backgrounds and keeps transparency (255 = the subject), with the image's file name; a
`masks/` folder inside the image's own subfolder is looked at first (several concept folders
may hold images of the same name), then the dataset's own `masks/` for the images under it. An image with no mask file but with an alpha channel is
masked by its alpha, as kohya's alpha_mask option does; an image with neither counts whole.

The mask follows the image through the same resize and centre crop to its bucket
(data.fit_to_bucket), then is downscaled to the latent's size by area averaging, as kohya's
apply_masked_loss does (its F.interpolate(mode="area") each step; here once, at caching).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lib_lora.training.data import Item, fit_to_bucket

MASKS_DIR = "masks"


def mask_file(image: Path, root: Path) -> Path | None:
    """The mask file of `image` in a dataset rooted at `root`, or None.

    The root's masks/ serves only images under the root: a regularisation image (in its own
    folder) of the same name as a training image must not take that image's mask."""
    names = dict.fromkeys((image.name, image.stem + ".png"))
    folders = [image.parent / MASKS_DIR]
    if image.is_relative_to(root):
        folders.append(root / MASKS_DIR)
    for folder in dict.fromkeys(folders):
        for name in names:
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def _source_mask(item: Item, root: Path, digests: dict[int, str]) -> Image.Image | None:
    """The item's mask at the image's own size (upright), or None when it has none; the sha256
    of a mask file's bytes goes into `digests` (what a resume compares)."""
    path = mask_file(item.path, root)
    if path is not None:
        data = path.read_bytes()
        digests[id(item)] = hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as im:
            mask = im.convert("L")
        if mask.size != item.size:  # a mask of another size still marks the same picture
            mask = mask.resize(item.size, Image.Resampling.BILINEAR)
        return mask
    from lib_lora.dataset.images import decode, inspect

    img = decode(inspect(item.path)).image  # upright, RGBA only where there is real transparency
    return img.getchannel("A") if img.mode == "RGBA" else None


def latent_mask(mask: Image.Image, bucket: tuple[int, int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """(1, h, w) fp32 in [0, 1]: the mask fitted to the bucket as its image is, then area-downscaled."""
    fitted = fit_to_bucket(mask, bucket)
    pixels = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0)[None, None]
    return F.interpolate(pixels, size=latent_hw, mode="area")[0]


@dataclass
class Masks:
    of: dict[int, torch.Tensor] = field(default_factory=dict)  # id(item) -> (1, h, w); empty: no masks at all
    found: int = 0  # images with a mask
    problems: list[str] = field(default_factory=list)  # one sentence per mask that could not be read
    digests: dict[int, str] = field(default_factory=dict)  # id(item) -> sha256 of its mask file, as read


def load_masks(items: Sequence[Item], root: Path, latent_of: dict[int, torch.Tensor]) -> Masks:
    """Every item's loss mask at its latent's size; images without one get ones (kohya fills a
    batch's missing masks with ones). No mask anywhere: `of` is empty (the loss is unweighted)."""
    out = Masks()
    for it in items:
        hw = tuple(latent_of[id(it)].shape[-2:])
        try:
            src = _source_mask(it, root, out.digests)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
            out.problems.append(f"The mask of {it.path.name} could not be read ({type(err).__name__}: {err}); "
                                "its loss is not masked.")
            src = None
        if src is None:
            out.of[id(it)] = torch.ones((1, *hw))
            continue
        out.of[id(it)] = latent_mask(src, it.bucket, hw)
        out.found += 1
    if not out.found:
        out.of = {}
    return out
