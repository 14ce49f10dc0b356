"""What sits beside a LoRA so the WebUI's card shows it at once: `<name>.json` (the card's
description, activation text and preferred weight, from the LoRA's own `ss_*` metadata) and
`<name>.preview.png`. Written by the trainer after the final LoRA (the preview from its last
sample image, when samples were made); the WebUI host rewrites the preview with one made
through its own txt2img at the end of the job."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any


def card(meta: dict[str, str], lora_path: Path) -> dict[str, Any]:
    """The `<name>.json` the WebUI's LoRA card reads (its metadata editor writes the same keys),
    from the LoRA's own `ss_*` metadata."""
    trigger = meta.get("ss_output_name") or lora_path.stem
    base = meta.get("ss_sd_model_name") or "the loaded checkpoint"
    short = (meta.get("ss_new_sd_model_hash") or "")[:10]
    steps = meta.get("ss_steps")
    images = meta.get("ss_num_train_images")
    notes = [f"{k[3:].replace('_', ' ')} {meta[k]}" for k in (
        "ss_network_dim", "ss_network_alpha", "ss_learning_rate", "ss_text_encoder_lr", "ss_optimizer",
        "ss_resolution", "ss_seed") if meta.get(k) not in (None, "", "None")]
    return {
        "description": f"Trained with Fast LoRA on {base}{f' [{short}]' if short else ''}"
                       f"{f' for {steps} steps' if steps else ''}{f' ({images} images with repeats)' if images else ''}.",
        "sd version": "SD1",
        "activation text": trigger,
        "preferred weight": 1.0,
        "negative text": "",
        "notes": ", ".join(notes) + f"; saved {datetime.date.today().isoformat()}",
    }


def preview_path(lora_path: Path) -> Path:
    return Path(lora_path).with_name(Path(lora_path).stem + ".preview.png")


def write_card(lora_path: Path, metadata: dict[str, str] | None = None, overwrite: bool = True) -> Path:
    """The card of a LoRA file, from its metadata (read from the file when not given).
    overwrite=False raises FileExistsError when a card is there already."""
    from lib_lora.atomic import atomic_write_json
    from lib_lora.training.export import read_metadata

    lora_path = Path(lora_path)
    meta = metadata if metadata is not None else read_metadata(lora_path)
    return atomic_write_json(lora_path.with_suffix(".json"), card(meta, lora_path), overwrite=overwrite)


def write_preview(lora_path: Path, image: Any, overwrite: bool = True) -> Path:
    from lib_lora.atomic import atomic_path

    target = preview_path(lora_path)
    with atomic_path(target, overwrite=overwrite) as tmp:
        image.save(tmp, format="PNG")
    return target
