"""Step 3: tag a folder of images and write `<image>.txt` captions.

Raw scores (everything above the tagger's floor) are kept in `<image dir>/.fastlora/scores.json`
so a new threshold, sort or trigger word can be applied later without running the tagger
again (`recaption`). Captions are written through the edit session, so tagging is one
undoable step like any other edit.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from lib_lora.atomic import atomic_write_json
from lib_lora.config import TagConfig
from lib_lora.dataset.background import background_tags
from lib_lora.dataset.images import BadImage, load_rgb
from lib_lora.errors import DatasetError
from lib_lora.imagefiles import list_images
from lib_lora.names import SUBSET_RE
from lib_lora.progress import Progress, check_cancel
from lib_lora.tagging.rules import load_data
from lib_lora.tagging.session import STATE_DIR, EditSession
from lib_lora.tagging.taggers import Tagger, map_threads, tag_category
from lib_lora.tagging.tagtext import dedupe, normalize, put_first, tag_from_model

SCORES_FILE = "scores.json"


@dataclass
class TagReport:
    image_dir: Path
    tagger: str
    images: int = 0
    tagged: int = 0
    captions_written: int = 0
    skipped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    trigger: str | None = None
    background: str | None = None
    tag_counts: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{self.image_dir}: {self.tagged} of {self.images} images tagged with {self.tagger}, "
                 f"{self.captions_written} captions written in {self.seconds:.1f} s."]
        if self.trigger:
            lines.append(f"trigger word first: {self.trigger}")
        if self.background:
            lines.append(f"backgrounds were removed: captions say '{self.background}'")
        if self.tag_counts:
            lines.append("most common: " + ", ".join(f"{t} x{n}" for t, n in self.tag_counts.most_common(12)))
        lines += [f"skipped: {s}" for s in self.skipped] + [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ folder facts


def read_manifest(image_dir: Path) -> dict[str, Any]:
    """The prepare step's manifest: `<train dir>/manifest.json` (one folder up), or beside the images."""
    for path in (image_dir.parent / "manifest.json", image_dir / "manifest.json"):
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                return data
    return {}


def background_from_manifest(manifest: dict[str, Any]) -> list[str] | None:
    """Tags that match the background prepare put behind the cut-outs, or None when backgrounds were kept."""
    bg = manifest.get("background")
    if not isinstance(bg, dict) or not bg.get("removed"):
        return None
    # Recomputed from the colour rather than read from bg["tags"]: manifests written before the
    # colour naming was fixed carry wrong tags.
    return background_tags(bg.get("color", "white"))


def default_trigger(image_dir: Path, manifest: dict[str, Any]) -> str | None:
    """The LoRA's name: from a `<repeats>_<name>` folder, else the manifest's name."""
    m = SUBSET_RE.match(image_dir.name)
    if m:
        return m.group(2)
    name = manifest.get("name")
    return str(name) if name else None


def image_dirs(dataset: str | Path) -> list[Path]:
    """The image folders of a dataset: the folder itself, or its `<repeats>_<name>` subfolders."""
    root = Path(dataset)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; give the folder that holds the images.")
    if list_images(root):
        return [root]
    # Only `<repeats>_<name>` folders: prepare's `masks/` beside them holds images that are no training data.
    subs = sorted(p for p in root.iterdir() if p.is_dir() and SUBSET_RE.match(p.name) and list_images(p))
    if not subs:
        raise DatasetError(f"No images in {root} or its subfolders; run the prepare step first or pick another folder.")
    return subs


# ---------------------------------------------------------------------------- captions


def caption_from_scores(scores: dict[str, float], categories: dict[str, str], cfg: TagConfig,
                        trigger: str | None = None, background: list[str] | None = None,
                        existing: list[str] | None = None) -> list[str]:
    """A caption from raw scores: thresholds, no ratings, sort, underscores, background, trigger first."""
    general, character = cfg.caption_threshold(), cfg.character_threshold
    picked = []
    for tag, score in scores.items():
        cat = categories.get(tag, "rating" if tag.startswith("rating:") else "general")
        if cat == "rating":
            continue
        if score >= (character if cat == "character" else general):
            picked.append((tag, score))
    if cfg.sort == "alphabetical":
        picked.sort(key=lambda ts: tag_from_model(ts[0], cfg.keep_underscores).lower())
    else:
        picked.sort(key=lambda ts: (-ts[1], ts[0]))
    if cfg.max_tags:
        picked = picked[: cfg.max_tags]
    tags = [tag_from_model(t, cfg.keep_underscores) for t, _ in picked]
    if existing:
        tags = existing + tags
    if background is not None:
        drop = load_data().backgrounds
        tags = [t for t in tags if normalize(t) not in drop] + background
    tags = dedupe(tags)
    if trigger:
        tags = put_first(tags, trigger)
    return tags


def _read_scores(image_dir: Path) -> dict[str, Any]:
    path = image_dir / STATE_DIR / SCORES_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("images"), dict):
                return data
        except ValueError:
            pass
    return {"images": {}}


def load_for_tagging(path: Path) -> Image.Image | str:
    """The image as training will see it (upright, transparency on white), or why it cannot be read."""
    try:
        return load_rgb(path)
    except BadImage as err:
        return str(err)


def tag_dataset(image_dir: Path, tagger: Tagger, cfg: TagConfig, progress: Progress | None = None) -> TagReport:
    """Tag every image of a folder, write its caption and keep the raw scores. One undoable step."""
    start = time.perf_counter()
    image_dir = Path(image_dir)
    session = EditSession(image_dir)
    manifest = read_manifest(image_dir)
    report = TagReport(image_dir, getattr(tagger, "name", type(tagger).__name__))
    report.trigger = cfg.trigger.strip() or default_trigger(image_dir, manifest)
    bg = background_from_manifest(manifest) if cfg.match_background else None
    report.background = ", ".join(bg) if bg else None
    report.problems += session.problems
    names = [p.name for p in list_images(image_dir)]
    report.images = len(names)
    if not names:
        raise DatasetError(f"No images in {image_dir}; run the prepare step first or pick another folder.")
    todo = []
    for name in names:
        if name not in session.captions:
            report.skipped.append(f"{name}: its caption file cannot be edited (see problems)")
        elif cfg.existing == "skip" and session.captions[name]:
            report.skipped.append(f"{name}: already has a caption")
        else:
            todo.append(name)

    store = _read_scores(image_dir)
    store.update({"tagger": report.tagger, "floor": getattr(tagger, "threshold", None)})
    new: dict[str, list[str]] = {}
    if progress is not None:
        progress.update(0, len(todo), f"tagging {len(todo)} images")
    for i in range(0, len(todo), cfg.batch_size):
        check_cancel(progress)
        batch, batch_names, images = todo[i : i + cfg.batch_size], [], []
        loaded_batch = map_threads(load_for_tagging, [image_dir / n for n in batch])
        for name, loaded in zip(batch, loaded_batch, strict=True):
            if isinstance(loaded, str):
                report.problems.append(f"{name}: {loaded} Not tagged.")
            else:
                images.append(loaded)
                batch_names.append(name)
        results = tagger.tag_images(images) if images else []
        for name, scores in zip(batch_names, results, strict=True):
            cats = {t: c for t in scores if (c := tag_category(tagger, t)) != "general"}
            store["images"][name] = {"scores": {t: round(float(s), 5) for t, s in scores.items()}, "categories": cats}
            keep = session.captions[name] if cfg.existing == "merge" else None
            new[name] = caption_from_scores(scores, cats, cfg, report.trigger, bg, keep)
            report.tag_counts.update(new[name])
            report.tagged += 1
        if progress is not None:
            progress.update(min(i + cfg.batch_size, len(todo)), len(todo), f"tagging {len(todo)} images")
    atomic_write_json(image_dir / STATE_DIR / SCORES_FILE, store)
    if report.trigger:
        session.set_trigger(report.trigger, apply=False)
    report.captions_written = session.commit(new, f"tag with {report.tagger}")
    report.seconds = time.perf_counter() - start
    return report


def recaption(image_dir: Path, cfg: TagConfig) -> TagReport:
    """Rewrite captions from the saved raw scores with new thresholds/sort/trigger (no tagger run)."""
    start = time.perf_counter()
    image_dir = Path(image_dir)
    store = _read_scores(image_dir)
    if not store["images"]:
        raise DatasetError(f"No saved tag scores in {image_dir}; tag the images first (python -m lib_lora tag).")
    session = EditSession(image_dir)
    manifest = read_manifest(image_dir)
    report = TagReport(image_dir, str(store.get("tagger", "saved scores")))
    report.trigger = cfg.trigger.strip() or default_trigger(image_dir, manifest)
    bg = background_from_manifest(manifest) if cfg.match_background else None
    report.background = ", ".join(bg) if bg else None
    report.problems += session.problems
    report.images = len(session.captions)
    new = {}
    for name, entry in store["images"].items():
        if name in session.captions:
            new[name] = caption_from_scores(entry["scores"], entry.get("categories", {}), cfg, report.trigger, bg)
            report.tag_counts.update(new[name])
            report.tagged += 1
    if report.trigger:
        session.set_trigger(report.trigger, apply=False)
    report.captions_written = session.commit(new, "re-caption from saved scores")
    report.seconds = time.perf_counter() - start
    return report
