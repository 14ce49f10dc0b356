"""Steps 1-2 as one function: a folder of photos in, a kohya training folder out.

    <out>/<name>/                     train_dir: what the trainer is given
        <repeats>_<name>/*.png        the prepared images (captions land beside them later)
        masks/*.png                   with keep_rgba: the foreground masks
        manifest.json                 per image: source, hashes, crop box, background model

The source folder is only read. Work is spread over processes; a re-run redoes only images
whose source or settings changed, and keeps crops the user adjusted.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import logging
import multiprocessing
import os
import re
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lib_lora.atomic import cleanup_stale_temps
from lib_lora.config import PrepareConfig, to_dict, validate
from lib_lora.dataset import background, faces
from lib_lora.dataset.hashing import NEAR_DUPLICATE_BITS, file_sha256
from lib_lora.dataset.manifest import read_manifest, records_of, write_manifest
from lib_lora.dataset.process import FatalError, Settings, Task, init_worker, process
from lib_lora.dataset.records import Box, ImageRecord
from lib_lora.errors import Cancelled, DatasetError, UserError, file_reason
from lib_lora.imagefiles import IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS
from lib_lora.names import validate_name
from lib_lora.progress import Progress, check_cancel

__all__ = ["ImageRecord", "PrepareReport", "prepare_dataset", "reprocess_image", "load_report", "default_workers"]

log = logging.getLogger(__name__)

# Bump when the processing itself changes, so re-runs redo images made the old way.
PIPELINE_VERSION = 1


@dataclass
class PrepareReport:
    train_dir: Path
    image_dir: Path
    items: list[ImageRecord]
    bg_removed: bool
    bg_color: str = "white"
    bg_model: str | None = None
    crop: str = "face"
    removed_outputs: list[Path] = field(default_factory=list)
    ignored_files: int = 0
    seconds: float = 0.0
    removed_temps: int = 0

    @property
    def kept(self) -> list[ImageRecord]:
        return [r for r in self.items if r.kept]

    @property
    def skipped(self) -> list[ImageRecord]:
        return [r for r in self.items if r.status == "skipped"]

    @property
    def warnings(self) -> list[ImageRecord]:
        return [r for r in self.items if r.status == "warning"]

    @property
    def faces_found(self) -> int:
        return sum(1 for r in self.kept if r.face_box is not None)

    def summary(self) -> str:
        kept = self.kept
        lines = [f"Kept {len(kept)} of {len(self.items)} images in {self.image_dir}"
                 f" ({self.seconds:.1f} s)."]
        focal = sum(1 for r in kept if r.crop_mode == "focal")
        if self.crop in ("face", "bucket"):
            lines.append(f"Faces found: {self.faces_found} of {len(kept)}"
                         + (f"; {focal} cropped around the busiest area instead." if focal else "."))
        if self.bg_removed:
            lines.append(f"Background: removed ({self.bg_model or 'source transparency'}), on {self.bg_color}.")
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)}:")
            lines += [f"  {r.line()}" for r in self.skipped]
        if self.warnings:
            lines.append(f"Warnings {len(self.warnings)}:")
            lines += [f"  {r.line()}" for r in self.warnings]
        unchanged = sum(1 for r in self.items if r.unchanged)
        if unchanged:
            lines.append(f"Unchanged since the last run (not redone): {unchanged}.")
        if self.removed_outputs:
            lines.append(f"Removed {len(self.removed_outputs)} outputs whose source is no longer in the folder.")
        if self.removed_temps:
            lines.append(f"Removed {self.removed_temps} temporary file(s) left by an interrupted run.")
        if self.ignored_files:
            lines.append(f"Ignored {self.ignored_files} files that are not images.")
        lines.append(f"Train on: {self.train_dir}")
        return "\n".join(lines)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _settings(cfg: PrepareConfig, threads: int = 0) -> Settings:
    bg_model = background.resolve_model(cfg.remove_bg, cfg.model_dir, cfg.download)
    yunet = faces.find_yunet(cfg.face_model, cfg.model_dir or _rembg_home())
    return Settings(size=cfg.size, crop=cfg.crop, upscale=cfg.upscale, keep_rgba=cfg.keep_rgba,
                    bg_rgb=background.parse_color(cfg.bg_color), bg_model=bg_model, yunet=yunet, threads=threads)


def _rembg_home() -> str:
    # rembg's rule (sessions/base.py), read here to avoid importing rembg when it is not needed.
    return os.path.expanduser(os.getenv("U2NET_HOME", os.path.join(os.getenv("XDG_DATA_HOME", "~"), ".u2net")))


def _fingerprint(s: Settings) -> str:
    data = {"v": PIPELINE_VERSION, "size": s.size, "crop": s.crop, "upscale": s.upscale, "rgba": s.keep_rgba,
            "bg": list(s.bg_rgb), "model": s.bg_model.identity() if s.bg_model else None, "yunet": s.yunet}
    return json.dumps(data, sort_keys=True)


def _paths(cfg: PrepareConfig) -> tuple[str, Path, Path]:
    name = validate_name(cfg.name, "dataset name")
    train_dir = Path(cfg.out).expanduser() / name
    return name, train_dir, train_dir / f"{cfg.repeats}_{name}"


def scan(src: Path, recursive: bool, exclude: Path | None = None) -> tuple[list[Path], list[ImageRecord], int]:
    """(image candidates, records of image files skipped with a reason, count of other files ignored)."""
    found, unsupported, ignored = [], [], 0
    walker = src.rglob("*") if recursive else src.glob("*")
    excl = exclude.resolve() if exclude else None
    for p in sorted(walker, key=lambda q: q.as_posix().casefold()):
        rel_parts = p.relative_to(src).parts
        if any(part.startswith(".") for part in rel_parts):  # hidden files and folders (.DS_Store, .git)
            continue
        ext = p.suffix.lower()
        try:
            p.stat()  # a symbolic link that loops (or points nowhere) cannot be resolved below
        except OSError as err:
            if ext in IMAGE_EXTENSIONS or ext in UNSUPPORTED_IMAGE_EXTENSIONS:
                why, todo = file_reason(err)
                unsupported.append(ImageRecord(p, status="skipped", message=f"cannot be opened: {why}; {todo}."))
            else:
                ignored += 1
            continue
        if excl is not None and (p.resolve() == excl or excl in p.resolve().parents):
            continue
        if not p.is_file():
            continue
        if ext in IMAGE_EXTENSIONS:
            found.append(p)
        elif ext in UNSUPPORTED_IMAGE_EXTENSIONS:
            unsupported.append(ImageRecord(p, status="skipped",
                                           message=f"{ext} is not supported: convert it to JPEG or PNG."))
        else:
            ignored += 1
    return found, unsupported, ignored


_UNSAFE_CHARS = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


def _safe_stem(stem: str) -> str:
    stem = _UNSAFE_CHARS.sub("_", unicodedata.normalize("NFC", stem)).strip().rstrip(".")
    return stem or "image"


def _assign_names(sources: list[Path], old: dict[str, ImageRecord], image_dir: Path) -> dict[str, Path]:
    """A unique output path per source; an earlier run's name is kept so captions stay paired."""
    taken: set[str] = set()
    names: dict[str, Path] = {}
    for p in sources:
        prev = old.get(str(p))
        if prev and prev.output is not None and prev.output.name.casefold() not in taken:
            names[str(p)] = image_dir / prev.output.name
            taken.add(prev.output.name.casefold())
    for p in sources:
        if str(p) in names:
            continue
        stem, n = _safe_stem(p.stem), 1
        cand = f"{stem}.png"
        while cand.casefold() in taken:
            n += 1
            cand = f"{stem}_{n}.png"
        taken.add(cand.casefold())
        names[str(p)] = image_dir / cand
    return names


def prepare_dataset(src: str | Path, cfg: PrepareConfig, progress: Progress | None = None) -> PrepareReport:
    """Import, check, crop and (optionally) cut out every image of `src` into a training folder."""
    t0 = time.perf_counter()
    cfg = validate(cfg)
    src = Path(src).expanduser()
    if not src.is_dir():
        raise UserError(f"The source folder {src} does not exist or is not a folder.")
    src = src.resolve()
    name, train_dir, image_dir = _paths(cfg)
    if train_dir.resolve() == src or train_dir.resolve() in src.parents:
        raise UserError(f"The output {train_dir} is the source folder or contains it; choose another --out.")
    # A killed run's half-written images and manifest (hidden temporary names); a live run's are kept.
    removed_temps = len(cleanup_stale_temps(train_dir, recursive=True))

    old_manifest = read_manifest(train_dir)
    old = records_of(old_manifest, train_dir)
    _move_image_dir(old_manifest, train_dir, image_dir, old)

    workers = cfg.workers or default_workers()
    settings = _settings(cfg, threads=max(1, default_workers() // workers) if workers > 1 else 0)
    fingerprint = _fingerprint(settings)

    candidates, records, ignored = scan(src, cfg.recursive, exclude=train_dir)
    if not candidates and not records:
        raise DatasetError(
            f"No images found in {src} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}"
            + ("" if cfg.recursive else "; turn on --recursive to include sub-folders") + ")."
        )
    names = _assign_names(candidates, old, image_dir)
    masks_dir = train_dir / "masks"

    tasks: list[tuple[ImageRecord, Task]] = []
    seen: dict[str, Path] = {}
    same_settings = bool(old_manifest) and old_manifest.get("fingerprint") == fingerprint
    for p in candidates:
        rec = ImageRecord(p)
        records.append(rec)
        try:
            if p.stat().st_size == 0:
                rec.status, rec.message = "skipped", "empty file (0 bytes)."
                continue
            rec.source_sha256 = file_sha256(p)
        except OSError as err:
            rec.status, rec.message = "skipped", f"cannot be read ({err.strerror or err})."
            continue
        if rec.source_sha256 in seen:
            rec.status, rec.message = "skipped", f"exact duplicate of {seen[rec.source_sha256].name}."
            rec.duplicate_of = seen[rec.source_sha256]
            continue
        seen[rec.source_sha256] = p
        prev = old.get(str(p))
        prev_same = prev is not None and prev.source_sha256 == rec.source_sha256
        if prev_same and same_settings and _output_intact(prev):
            records[-1] = dataclasses.replace(prev, unchanged=True, output=names[str(p)] if prev.output else None,
                                              mask=prev.mask)
            continue
        override = prev.crop_box if prev_same and prev.crop_mode == "manual" else None
        out = names[str(p)]
        tasks.append((rec, Task(str(p), str(out), str(masks_dir / out.name), settings, override)))

    try:
        _run(tasks, workers, progress, _mp_context())
    except Cancelled:
        # Keep what is finished, so running again carries on instead of starting over.
        finished = [r for r in records if r.output is not None or r.status == "skipped"]
        _save(_report(train_dir, image_dir, finished, cfg, settings, [], ignored, time.perf_counter() - t0,
                      removed_temps), cfg, src, fingerprint)
        raise
    _mark_near_duplicates(records)

    removed = _remove_stale(old, {str(r.source) for r in records if r.kept}, train_dir)
    report = _report(train_dir, image_dir, records, cfg, settings, removed, ignored, time.perf_counter() - t0,
                     removed_temps)
    _save(report, cfg, src, fingerprint)
    if not report.kept:
        raise DatasetError(f"None of the {len(records)} files in {src} could be used:\n{report.summary()}")
    return report


def _output_intact(rec: ImageRecord) -> bool:
    if rec.status == "skipped":
        return rec.output is None  # skipped before: same bytes will be skipped again
    if rec.output is None or not rec.output.is_file():
        return False
    return file_sha256(rec.output) == rec.output_sha256


def _move_image_dir(old_manifest: dict | None, train_dir: Path, image_dir: Path, old: dict[str, ImageRecord]) -> None:
    """Changing --repeats renames <repeats>_<name>; the images (and their captions) move with it."""
    if not old_manifest or not old_manifest.get("image_dir"):
        return
    prev = train_dir / old_manifest["image_dir"]
    if prev == image_dir or not prev.is_dir() or image_dir.exists():
        return
    os.replace(prev, image_dir)
    for rec in old.values():
        if rec.output is not None and rec.output.parent == prev:
            rec.output = image_dir / rec.output.name


def _mp_context() -> multiprocessing.context.BaseContext:
    """How worker processes start.

    Never plain fork: by the time we run, the parent may hold native thread pools (OpenCV's,
    onnxruntime's, the WebUI's) whose locks a forked child would inherit locked, and hang.
    forkserver forks each worker from a small clean server process that has our worker module
    preloaded: the first pool of a process pays ~1 s to start that server, later ones start in
    milliseconds. Where there is no forkserver (Windows, macOS by policy) we spawn.
    """
    if sys.platform.startswith("linux"):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["lib_lora.dataset.process"])
        return ctx
    return multiprocessing.get_context("spawn")


def _run(tasks: list[tuple[ImageRecord, Task]], workers: int, progress: Progress | None,
         ctx: multiprocessing.context.BaseContext) -> None:
    total = len(tasks)
    if progress is not None:
        progress.update(0, total, "")
    if not total:
        return
    done = 0

    def take(rec: ImageRecord, result: ImageRecord) -> None:
        nonlocal done
        sha = rec.source_sha256
        rec.__dict__.update(result.__dict__)
        rec.source_sha256 = sha
        done += 1
        if progress is not None:
            progress.update(done, total, rec.source.name)

    def inline(todo: list[tuple[ImageRecord, Task]]) -> None:
        for rec, task in todo:
            check_cancel(progress)
            try:
                take(rec, process(task))
            except FatalError as err:
                raise UserError(str(err)) from None

    if workers <= 1 or total == 1:
        inline(tasks)
        return
    n = min(workers, total)
    pool = cf.ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=init_worker,
                                  initargs=(max(1, default_workers() // n),))
    broken_at_start = False
    futures: dict[cf.Future, tuple[ImageRecord, Task]] = {}
    try:
        try:
            for rec, task in tasks:
                futures[pool.submit(process, task)] = (rec, task)
        except (cf.process.BrokenProcessPool, OSError) as err:
            # Workers that die as they start can break the pool while we are still submitting;
            # the next worker's start then fails too (a closed pipe). Nothing is done yet.
            log.debug("prepare: pool broke while submitting: %s", err)
            broken_at_start = True
        for fut in [] if broken_at_start else cf.as_completed(futures):
            rec, _ = futures[fut]
            try:
                result = fut.result()
            except FatalError as err:
                raise UserError(str(err)) from None
            except cf.process.BrokenProcessPool:
                if done == 0:  # the workers could not start at all (an odd host): work here instead
                    broken_at_start = True
                    break
                result = ImageRecord(rec.source, status="skipped",
                                     message="a worker process died (out of memory?); set --workers to 1 and try again.")
            take(rec, result)
            if progress is not None and progress.cancelled():
                raise Cancelled()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if broken_at_start:
        log.warning("prepare: worker processes failed to start; processing in this process instead.")
        inline(tasks)


def _mark_near_duplicates(records: list[ImageRecord]) -> None:
    kept = [r for r in records if r.kept and r.phash]
    if len(kept) < 2:
        return
    hashes = np.array([int(r.phash, 16) for r in kept], dtype=np.uint64)
    unchanged = np.array([r.unchanged for r in kept])
    order = np.arange(len(kept))
    for i in range(len(kept)):
        if kept[i].unchanged:  # already checked (and reported) by the run that made it
            continue
        x = np.bitwise_xor(hashes, hashes[i])
        dist = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        # Against every other kept image (unchanged ones after it too), but not itself nor later
        # new ones: those check against this one, so of two new near duplicates the later is flagged.
        dist[(order >= i) & ~unchanged] = 65
        j = int(dist.argmin())
        if dist[j] <= NEAR_DUPLICATE_BITS:
            r = kept[i]
            r.status = "warning"
            note = f"near duplicate of {kept[j].source.name} (kept; remove one if it is the same photo)"
            r.message = f"{r.message}; {note}" if r.message else note
            r.duplicate_of = kept[j].source


def _remove_stale(old: dict[str, ImageRecord], current: set[str], train_dir: Path) -> list[Path]:
    """Outputs of an earlier run whose source is gone: ours to delete (captions stay)."""
    removed = []
    root = train_dir.resolve()  # both sides resolved: a relative --out (the default) must still match
    for key, rec in old.items():
        if key in current:
            continue
        for path in (rec.output, rec.mask):
            if path is not None and path.is_file() and root in path.resolve().parents:
                path.unlink()
                removed.append(path)
    return removed


def _report(train_dir: Path, image_dir: Path, records: list[ImageRecord], cfg: PrepareConfig, s: Settings,
            removed: list[Path], ignored: int, seconds: float, removed_temps: int = 0) -> PrepareReport:
    records = sorted(records, key=lambda r: r.source.as_posix().casefold())
    kept = [r for r in records if r.kept]
    bg_removed = bool(kept) and all(r.background_removed for r in kept)
    return PrepareReport(train_dir=train_dir, image_dir=image_dir, items=records, bg_removed=bg_removed,
                         bg_color=cfg.bg_color, bg_model=s.bg_model.spec if s.bg_model else None, crop=cfg.crop,
                         removed_outputs=removed, ignored_files=ignored, seconds=seconds,
                         removed_temps=removed_temps)


def _save(report: PrepareReport, cfg: PrepareConfig, src: Path, fingerprint: str) -> None:
    write_manifest(report.train_dir, {
        "name": validate_name(cfg.name), "source_dir": str(src), "image_dir": report.image_dir.name,
        "config": to_dict(cfg), "fingerprint": fingerprint,
        "background": _background_entry(report.bg_removed, _seen_color(cfg), report.bg_model),
        "items": [r.to_json(report.train_dir) for r in report.items],
    })


def _seen_color(cfg: PrepareConfig) -> str:
    """The background colour training and tagging see. Images kept with transparency are read on
    white (dataset.images.load_rgb), whatever colour sits under their alpha, so their captions
    must say white."""
    return "white" if cfg.keep_rgba else cfg.bg_color


def _background_entry(removed: bool, color: str, model: str | None) -> dict:
    """What the tagging step reads: whether backgrounds are plain now, and on what colour (the tags are
    for people: tagging recomputes them from the colour, so old manifests get today's naming)."""
    return {"removed": removed, "color": color, "rgb": list(background.parse_color(color)), "model": model,
            "tags": background.background_tags(color) if removed else []}


def reprocess_image(train_dir: Path, source: str | Path, crop_box: tuple[int, int, int, int]) -> ImageRecord:
    """Redo one image of a prepared folder with a user-adjusted crop box (source pixels, oriented).

    The box is kept in the manifest, so later re-runs of prepare reuse it.
    """
    train_dir = Path(train_dir)
    data = read_manifest(train_dir)
    if data is None:
        raise UserError(f"{train_dir} has no readable manifest.json: run prepare on it first.")
    cfg = PrepareConfig(**{k: v for k, v in data.get("config", {}).items()
                           if k in {f.name for f in dataclasses.fields(PrepareConfig)}})
    cfg = dataclasses.replace(cfg, download=False)
    old = records_of(data, train_dir)
    key = str(Path(source))
    if key not in old:
        key = str(Path(source).expanduser().resolve())
    if key not in old:
        raise UserError(f"{source} is not part of the dataset in {train_dir}.")
    prev = old[key]
    image_dir = train_dir / data["image_dir"]
    if prev.output is not None:
        out = prev.output
    else:
        out = _assign_names([prev.source], {}, image_dir)[str(prev.source)]
        taken = {r.output.name.casefold() for r in old.values() if r.output is not None}
        n = 2
        while out.name.casefold() in taken:
            out = image_dir / f"{_safe_stem(prev.source.stem)}_{n}.png"
            n += 1
    settings = _settings(cfg)
    box: Box = tuple(int(round(v)) for v in crop_box)  # type: ignore[assignment]
    try:
        rec = process(Task(str(prev.source), str(out), str(train_dir / "masks" / out.name), settings, box))
    except FatalError as err:
        raise UserError(str(err)) from None
    if rec.status == "skipped":
        raise UserError(f"{prev.source.name}: {rec.message}")
    rec.source_sha256 = file_sha256(prev.source)
    rec.duplicate_of = prev.duplicate_of
    records = [rec if r is prev else r for r in old.values()]
    kept = [r for r in records if r.kept]
    data["items"] = [r.to_json(train_dir) for r in records]
    data["background"] = _background_entry(bool(kept) and all(r.background_removed for r in kept),
                                           _seen_color(cfg), data.get("background", {}).get("model"))
    write_manifest(train_dir, data)
    return rec


def load_report(train_dir: str | Path) -> PrepareReport:
    """The report of the last prepare run on `train_dir`, rebuilt from its manifest (for the UI)."""
    train_dir = Path(train_dir)
    data = read_manifest(train_dir)
    if data is None:
        raise UserError(f"{train_dir} has no readable manifest.json: run prepare on it first.")
    bg = data.get("background", {})
    return PrepareReport(train_dir=train_dir, image_dir=train_dir / data["image_dir"],
                         items=list(records_of(data, train_dir).values()), bg_removed=bool(bg.get("removed")),
                         bg_color=bg.get("color", "white"), bg_model=bg.get("model"),
                         crop=data.get("config", {}).get("crop", "face"))
