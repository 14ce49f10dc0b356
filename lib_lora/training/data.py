"""The training data: dataset scan, captions, aspect-ratio buckets, the step plan, caption
tokens and cached latents.

Layout (kohya's): a folder of `<repeats>_<class tokens>` subfolders, or a plain folder of
images trained `cfg.repeats` times. Each image may have a caption `<stem>.txt` / `.caption`
(first line); images without one get the class tokens. Bad images or captions are reported
once and skipped; the run goes on with the rest. `cfg.subsets` lists several such folders,
each with its own repeats and caption settings; `cfg.reg_data_dir` adds regularisation
images, repeated as kohya repeats them (`balance_reg`) and weighted by `prior_loss_weight`.

Each image file is read twice at most: its header at the scan (size and EXIF orientation,
enough to bucket and plan), then its bytes once when its latent is cached (hashed for the
cache key, decoded only when the cache has no latent for it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from lib_lora.dataset.images import inspect, load_rgb
from lib_lora.errors import DatasetError
from lib_lora.imagefiles import IMAGE_EXTENSIONS, list_images
from lib_lora.names import SUBSET_RE
from lib_lora.training.family import SD15, ModelFamily

if TYPE_CHECKING:
    from lib_lora.config import TrainConfig
    from lib_lora.progress import Progress
    from lib_lora.training.backbone import Backbone

log = logging.getLogger(__name__)

CAPTION_EXTENSIONS = (".txt", ".caption")


# --------------------------------------------------------------------------------------------
# Scan


# The options a subset may set for itself (config.SUBSET_KEYS less image_dir, repeats, is_reg,
# class_tokens and caption_extension, which the scan uses): how its captions and images vary.
CAPTION_FIELDS = ("keep_tokens", "keep_tokens_separator", "shuffle_caption", "caption_dropout_rate",
                  "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "caption_prefix",
                  "caption_suffix", "flip_aug")


@dataclass(frozen=True)
class CaptionSettings:
    """How one subset's captions are processed each time an image is drawn (kohya's
    `process_caption`) and whether its images are mirrored (`flip_aug`)."""

    keep_tokens: int = 1
    keep_tokens_separator: str = ""
    shuffle_caption: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    caption_prefix: str = ""
    caption_suffix: str = ""
    flip_aug: bool = False

    @property
    def varies(self) -> bool:
        """Whether a caption comes out as a new string nearly every time (shuffled or with tags
        dropped): then caching its tokens or text-encoder outputs would only grow the caches.
        A dropped caption is one more fixed string (""), so caption dropout keeps the caches."""
        return self.shuffle_caption or self.caption_tag_dropout_rate > 0


def caption_settings(cfg: TrainConfig, overrides: dict[str, Any] | None = None) -> CaptionSettings:
    """The run's caption settings, with a subset's own values where it gives them."""
    values = {k: getattr(cfg, k) for k in CAPTION_FIELDS}
    values.update({k: v for k, v in (overrides or {}).items() if k in CAPTION_FIELDS})
    return CaptionSettings(**values)


@dataclass
class Item:
    """One training image."""

    path: Path
    caption: str  # first caption line, or the class tokens
    repeats: int
    subset: str  # the folder it came from (its name, as kohya's metadata keys it)
    size: tuple[int, int]  # (width, height) after EXIF rotation
    bucket: tuple[int, int] = (0, 0)  # (width, height) it is trained at
    digest: str = ""  # sha256 of the file's bytes: the latent cache key (set by cache_latents)
    is_reg: bool = False  # a regularisation image: its loss is weighted by prior_loss_weight
    settings: CaptionSettings = CaptionSettings()


@dataclass
class Subset:
    folder: Path
    repeats: int
    class_tokens: str
    is_reg: bool = False
    settings: CaptionSettings = CaptionSettings()
    caption_extension: str = ".txt"


@dataclass
class StepPlan:
    """What a run will do, known before any model is loaded; shown before training."""

    dataset_dir: str
    images: int  # distinct usable images
    images_with_repeats: int  # kohya's ss_num_train_images (regularisation images not counted)
    subsets: list[dict[str, Any]]  # [{folder, repeats, images}], is_reg: True for regularisation ones
    buckets: dict[str, int]  # "WxH" -> images in that bucket
    batch_size: int
    steps_per_epoch: int  # sum over buckets of ceil(images x repeats / batch)
    epochs: int
    total_steps: int  # epochs x steps_per_epoch, or max_steps when set
    skipped: list[dict[str, str]]  # [{path, reason}] bad images or captions
    reg_images: int = 0  # distinct regularisation images (kohya's ss_num_reg_images)
    reg_images_with_repeats: int = 0  # as balance_reg repeats them: about images_with_repeats

    def describe(self, skipped_since: int = 0) -> str:
        """The plan for people; of the skipped files, those after the first `skipped_since` (the
        ones an earlier description did not list yet)."""
        lines = [f"Dataset {self.dataset_dir}: {self.images} images, {self.images_with_repeats} with repeats."]
        for s in self.subsets:
            if s.get("is_reg"):
                lines.append(f"  {s['folder']}: {s['images']} regularisation images")
            else:
                lines.append(f"  {s['folder']}: {s['images']} images x {s['repeats']} repeats")
        if self.reg_images:
            lines.append(f"  regularisation: {self.reg_images} images, repeated to {self.reg_images_with_repeats} "
                         "per epoch to match the training images")
        lines.append(
            "  buckets: " + ", ".join(f"{k} ({v} image{'s' if v != 1 else ''})" for k, v in self.buckets.items())
        )
        ep = f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}"
        if self.total_steps == self.epochs * self.steps_per_epoch:
            lines.append(f"Steps: {self.steps_per_epoch} per epoch (batch {self.batch_size}) x {ep} = {self.total_steps} steps.")
        else:
            lines.append(
                f"Steps: {self.steps_per_epoch} per epoch (batch {self.batch_size}); "
                f"max_steps = {self.total_steps} steps ({ep}, the last one partial)."
            )
        new = self.skipped[skipped_since:]
        if new:
            lines.append(f"Skipped {len(new)}{' more' if skipped_since else ''} file(s):")
            lines.extend(f"  {s['path']}: {s['reason']}" for s in new[:20])
            if len(new) > 20:
                lines.append(f"  ... and {len(new) - 20} more")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Dataset:
    root: Path
    subsets: list[Subset]
    items: list[Item]  # every usable image, in a stable order
    plan: StepPlan


def max_repeats() -> int:
    """The schema's bound on repeats, which a `<repeats>_<name>` folder name must keep too."""
    from lib_lora.config import TrainConfig

    return next(f for f in dataclasses.fields(TrainConfig) if f.name == "repeats").metadata["max"]


def find_subsets(dataset_dir: Path, cfg: TrainConfig, entry: dict[str, Any] | None = None,
                 is_reg: bool = False) -> list[Subset]:
    """The `<repeats>_<name>` subfolders, or the folder itself with cfg.repeats; `entry` (one
    of cfg.subsets) gives its own repeats, class tokens and caption settings over the run's."""
    entry = entry or {}
    is_reg = bool(entry.get("is_reg", is_reg))
    what = "regularisation folder" if is_reg else "dataset folder"
    if not dataset_dir.is_dir():
        raise DatasetError(f"The {what} {dataset_dir} does not exist; give a folder of images.")
    settings = caption_settings(cfg, entry)
    class_tokens = entry.get("class_tokens") or cfg.class_tokens
    extension = entry.get("caption_extension", cfg.caption_extension)

    def subset(folder: Path, repeats: int, name: str) -> Subset:
        return Subset(folder, entry.get("repeats", repeats), class_tokens or name, is_reg, settings, extension)

    subsets = []
    for sub in sorted(p for p in dataset_dir.iterdir() if p.is_dir()):
        m = SUBSET_RE.match(sub.name)
        if m and list_images(sub):
            repeats = int(m[1])
            if repeats < 1:
                raise DatasetError(f"{sub.name}: the repeat count before '_' must be at least 1.")
            if repeats > (most := max_repeats()):  # the epoch list holds each image `repeats` times
                raise DatasetError(f"{sub.name}: {repeats} repeats is more than {most}; rename the folder with a "
                                   "smaller number before '_' (10 to 100 is usual).")
            subsets.append(subset(sub, repeats, m[2].strip()))
    if subsets:
        return subsets
    if list_images(dataset_dir):
        name = dataset_dir.name
        m = SUBSET_RE.match(name)
        repeats = int(m[1]) if m and entry and int(m[1]) >= 1 else (1 if is_reg else cfg.repeats)
        return [subset(dataset_dir, repeats, m[2] if m else name)]
    others = [p.name for p in dataset_dir.iterdir() if p.is_dir() and list_images(p)]
    hint = (
        f" Its subfolders with images ({', '.join(others[:3])}) need names like '10_{others[0]}' "
        "(<repeats>_<name>)."
        if others
        else f" Put the images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in it, or in '<repeats>_<name>' subfolders."
    )
    raise DatasetError(f"No {'regularisation' if is_reg else 'training'} images found in {dataset_dir}.{hint}")


def dataset_subsets(cfg: TrainConfig, dataset_dir: str | Path | None = None) -> list[Subset]:
    """Every subset of the run: cfg.subsets' folders (else the dataset folder), then the
    regularisation folder's."""
    if cfg.subsets:
        subsets = [s for e in cfg.subsets for s in find_subsets(Path(e["image_dir"]).expanduser(), cfg, e)]
    else:
        subsets = find_subsets(Path(dataset_dir if dataset_dir is not None else cfg.dataset).expanduser(), cfg)
    if cfg.reg_data_dir:
        subsets += find_subsets(Path(cfg.reg_data_dir).expanduser(), cfg, is_reg=True)
    return subsets


def balance_reg(items: list[Item]) -> list[Item]:
    """kohya's repeats of regularisation images: each in turn is taken with its folder's
    repeats until they add up to the training images' (with repeats); when all are taken and
    they still fall short, each in turn gets one repeat more until they match. Images not
    reached are left out, so an epoch holds about as many class images as training images."""
    train = sum(it.repeats for it in items if not it.is_reg)
    reg = [it for it in items if it.is_reg]
    if not reg:
        return items
    used: set[int] = set()
    n, first = 0, True
    while n < train:
        for it in reg:
            if first:
                used.add(id(it))
                n += it.repeats
            else:
                it.repeats += 1
                n += 1
            if n >= train:
                break
        first = False
    return [it for it in items if not it.is_reg or id(it) in used]


def read_caption(image: Path, preferred: str = ".txt") -> str | None:
    """The first line of the image's caption file, '' for an empty one, None when it has none.

    Raises ValueError for a caption that is not UTF-8 text."""
    for ext in (preferred, *(e for e in CAPTION_EXTENSIONS if e != preferred)):
        cap = image.with_suffix(ext)
        if cap.is_file():
            raw = cap.read_bytes()
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError:
                raise ValueError(f"caption {cap.name} is not UTF-8 text; re-save it as UTF-8") from None
            lines = text.splitlines()
            return lines[0].strip() if lines else ""
    return None


def _unreadable(err: Exception) -> str:
    """The skip reason of an image that could not be read or decoded."""
    return f"not a readable image ({type(err).__name__}: {err})"


def _report_skip(path: Path, reason: str, on_skip: Callable[[Path, str], None] | None) -> None:
    # At debug level: the step plan lists every skipped file once, and is what the CLI and UI show.
    log.debug("skipping %s: %s", path, reason)
    if on_skip:
        on_skip(path, reason)


@dataclass(frozen=True)
class ImageFacts:
    """What the scan learns from one image file's header."""

    size: tuple[int, int] = (0, 0)  # (width, height) after EXIF rotation
    error: str = ""  # why it cannot be used; "" when it can


def read_image(path: Path) -> ImageFacts:
    """The image's size (after EXIF rotation) from its header, or why it cannot be used.

    No decode: a file broken past its header (truncated) is found when its latent is cached,
    and dropped then (cache_latents), before the first step."""
    try:
        return ImageFacts(inspect(path).size)
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
        return ImageFacts(error=_unreadable(err))


def scan_dataset(
    dataset_dir: str | Path,
    cfg: TrainConfig,
    on_skip: Callable[[Path, str], None] | None = None,
    read: Callable[[Path], ImageFacts] = read_image,
) -> Dataset:
    """Read the dataset's captions and image headers (every image through `read`), assign
    buckets and plan the steps.

    `read` may be a memo of read_image (the UI's live step count keeps one, lib_lora.filememo);
    training always reads the files afresh."""
    if not cfg.subsets and not str(dataset_dir).strip():  # Path("") would be the current folder
        raise DatasetError("No dataset folder given: choose the folder of training images, or list image "
                           "folders in subsets.")
    root = Path(dataset_dir).expanduser()
    subsets = dataset_subsets(cfg, root)
    skipped: list[dict[str, str]] = []

    def skip(path: Path, reason: str) -> None:
        skipped.append({"path": str(path), "reason": reason})
        _report_skip(path, reason, on_skip)

    items: list[Item] = []
    for sub in subsets:
        for img in list_images(sub.folder):
            try:
                caption = read_caption(img, sub.caption_extension)
            except (OSError, ValueError) as err:
                skip(img, str(err))
                continue
            facts = read(img)
            if facts.error:
                skip(img, facts.error)
                continue
            size = facts.size
            item = Item(img, caption or sub.class_tokens, sub.repeats, sub.folder.name, size,
                        is_reg=sub.is_reg, settings=sub.settings)
            bucket = choose_bucket(size, cfg)
            if bucket is None:
                skip(img, f"too small ({size[0]}x{size[1]}) for buckets of {cfg.bucket_reso_steps} px steps")
                continue
            item.bucket = bucket
            items.append(item)
    if not items:
        raise DatasetError(f"None of the images in {root} could be used (see the messages above); fix or replace them.")
    if all(it.is_reg for it in items):
        raise DatasetError("There are only regularisation images; give the training images too.")
    items = balance_reg(items)
    plan = make_plan(root, subsets, items, cfg, skipped)
    return Dataset(root, subsets, items, plan)


def plan_steps(dataset_dir: str | Path, cfg: TrainConfig, read: Callable[[Path], ImageFacts] = read_image) -> StepPlan:
    """The step plan of a dataset under a config (images, repeats, buckets, steps): the same
    scan as training's, so the same numbers."""
    return scan_dataset(dataset_dir, cfg, read=read).plan


def make_plan(
    root: Path, subsets: list[Subset], items: list[Item], cfg: TrainConfig, skipped: list[dict[str, str]]
) -> StepPlan:
    per_bucket: dict[tuple[int, int], int] = Counter()
    images: dict[tuple[int, int], int] = Counter()
    # Counted from the items, so images dropped later (an unreadable latent) leave the counts right.
    per_subset = Counter((it.subset, it.is_reg) for it in items)
    for it in items:
        per_bucket[it.bucket] += it.repeats
        images[it.bucket] += 1
    steps_per_epoch = sum(math.ceil(n / cfg.batch_size) for n in per_bucket.values())
    if cfg.max_steps:
        total = cfg.max_steps
        epochs = math.ceil(total / steps_per_epoch)
    else:
        epochs = cfg.epochs
        total = epochs * steps_per_epoch
    order = sorted(images, key=lambda b: (b[0] * b[1], b))
    return StepPlan(
        # with subsets the folders are theirs (the dataset field is then unused)
        dataset_dir=", ".join(str(e["image_dir"]) for e in cfg.subsets) if cfg.subsets else str(root),
        images=sum(1 for it in items if not it.is_reg),
        images_with_repeats=sum(it.repeats for it in items if not it.is_reg),
        subsets=[{"folder": s.folder.name, "repeats": s.repeats, "images": per_subset[(s.folder.name, s.is_reg)],
                  **({"is_reg": True} if s.is_reg else {})}
                 for s in subsets if per_subset[(s.folder.name, s.is_reg)]],
        buckets={f"{w}x{h}": images[(w, h)] for w, h in order},
        batch_size=cfg.batch_size,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        total_steps=total,
        skipped=skipped,
        reg_images=sum(1 for it in items if it.is_reg),
        reg_images_with_repeats=sum(it.repeats for it in items if it.is_reg),
    )


# --------------------------------------------------------------------------------------------
# Buckets


def _floor(x: float, step: int) -> int:
    return int(x // step) * step


def bucket_sizes(cfg: TrainConfig) -> list[tuple[int, int]]:
    """Buckets of (at most) the training resolution's area, sides multiples of bucket_reso_steps,
    between the min and max bucket side."""
    step = cfg.bucket_reso_steps
    area = cfg.resolution * cfg.resolution
    lo = max(step, _floor(min(cfg.min_bucket_reso, cfg.resolution), step))
    hi = max(_floor(max(cfg.max_bucket_reso, cfg.resolution), step), lo)
    sizes = set()
    w = lo
    while w <= hi:
        h = min(hi, _floor(area / w, step))
        if h >= lo:
            sizes.add((w, h))
            sizes.add((h, w))
        w += step
    square = _floor(cfg.resolution, step)
    sizes.add((square, square))
    return sorted(sizes)


def _snap(x: float, step: int) -> int:
    """A side in pixels: rounded to a whole pixel, then down to a multiple of the step."""
    return int(x + 0.5) // step * step


def _downscaled_bucket(w: int, h: int, area: int, step: int) -> tuple[int, int] | None:
    """kohya's no-upscale bucket of an image larger than `area` pixels.

    The image is scaled to `area` keeping its aspect ratio. One side is snapped to the step
    and the other follows from the aspect ratio, snapped too; of the two ways (width first,
    height first) the one whose bucket has the aspect ratio nearer the image's wins, height
    first on a tie. So a 4:3 photo gets 512x384 at 512, all of it, where snapping both scaled
    sides separately gave 576x384 and cropped a tenth of it."""
    ratio = w / h
    scaled_w = math.sqrt(area * ratio)
    scaled_h = area / scaled_w
    candidates = []
    bw = _snap(scaled_w, step)
    candidates.append((bw, _snap(bw / ratio, step)))
    bh = _snap(scaled_h, step)
    candidates.append((_snap(bh * ratio, step), bh))

    def error(b: tuple[int, int]) -> float:
        # A side snapped to 0 is no bucket (kohya divides by it); the other way may still fit.
        return abs(b[0] / b[1] - ratio) if b[0] and b[1] else math.inf

    best = min(reversed(candidates), key=error)  # min keeps the first of equals: height first
    return best if error(best) < math.inf else None


def choose_bucket(size: tuple[int, int], cfg: TrainConfig) -> tuple[int, int] | None:
    """The (width, height) an image is trained at, as kohya's sd-scripts chooses it; None when
    it is too small to train.

    No upscale (the default): an image within the training area keeps its size, floored to the
    step; a larger one is scaled down to the area first (`_downscaled_bucket`). Otherwise: the
    predefined bucket of the image's exact size, else the one of the nearest aspect ratio (the
    first in (width, height) order among equals)."""
    w, h = size
    step = cfg.bucket_reso_steps
    if not cfg.enable_buckets:
        side = _floor(cfg.resolution, step)
        return (side, side)
    area = cfg.resolution * cfg.resolution
    if cfg.bucket_no_upscale:
        if w * h > area:
            return _downscaled_bucket(w, h, area, step)
        bw, bh = _floor(w, step), _floor(h, step)
        return (bw, bh) if bw and bh else None
    sizes = bucket_sizes(cfg)
    if (w, h) in sizes:
        return (w, h)
    ratio = w / h
    return min(sizes, key=lambda b: abs(b[0] / b[1] - ratio))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize so the image covers the bucket (keeping its aspect ratio), then centre-crop."""
    bw, bh = bucket
    w, h = image.size
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (rw, rh) != (w, h):
        image = image.resize((rw, rh), Image.Resampling.LANCZOS)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return image.crop((left, top, left + bw, top + bh))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3,H,W) float in [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------
# Captions and tokens


def _tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def process_caption(caption: str, s: CaptionSettings, epoch: int, rng: random.Random | None) -> str:
    """The caption an image is trained with this time, as kohya's `process_caption` makes it.

    The prefix and suffix are added first (so keep_tokens counts the prefix's tags). Then the
    whole caption is dropped ("") with probability caption_dropout_rate, and in every N-th
    epoch (kohya counts epochs from 1: N = 2 drops the 2nd, 4th, ...). Otherwise the tags split
    into a kept head (the first keep_tokens, or the text before keep_tokens_separator), the
    rest, and with a second separator a kept tail; the rest is shuffled (shuffle_caption), then
    each of its tags dropped with probability caption_tag_dropout_rate. The separator is
    always taken out (kohya leaves it in a caption neither shuffled nor tag-dropped).

    Draws come from `rng` only for the options that are on, so a run with none of them draws
    what it drew before they existed. rng=None: nothing random (the caption every draw shares)."""
    if s.caption_prefix:
        caption = s.caption_prefix + " " + caption
    if s.caption_suffix:
        caption = caption + " " + s.caption_suffix
    if rng is not None:
        dropped = s.caption_dropout_rate > 0 and rng.random() < s.caption_dropout_rate
        every = s.caption_dropout_every_n_epochs
        if dropped or (every > 0 and (epoch + 1) % every == 0):
            return ""
    sep = s.keep_tokens_separator
    split = bool(sep) and sep in caption
    randomised = rng is not None and s.varies
    if not (split or randomised):
        return caption
    if split:
        head, rest = caption.split(sep, 1)
        rest, _, tail = rest.partition(sep)
        fixed, flex, fixed_tail = _tags(head), _tags(rest), _tags(tail)
    else:
        tags = _tags(caption)
        fixed, flex, fixed_tail = tags[: s.keep_tokens], tags[s.keep_tokens :], []
    if rng is not None and s.shuffle_caption:
        rng.shuffle(flex)
    if rng is not None and s.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= s.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + fixed_tail)


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """Shuffle the comma-separated tags after the first `keep_tokens` (the trigger word stays)."""
    return process_caption(caption, CaptionSettings(keep_tokens=keep_tokens, shuffle_caption=True), 0, rng)


def tag_frequency(dataset: Dataset) -> dict[str, dict[str, int]]:
    """{subset folder: {tag: count}} as kohya's ss_tag_frequency: each image's caption counted
    once, its comma-separated tags stripped and lower-cased ("Red Shirt" and "red shirt" are
    one tag, as the WebUI's training-tags table should list them)."""
    freq: dict[str, Counter] = {}
    for it in dataset.items:
        c = freq.setdefault(it.subset, Counter())
        c.update(t.strip().lower() for t in it.caption.split(",") if t.strip())
    return {k: dict(v) for k, v in freq.items()}


def bucket_info(items: Sequence[Item], cfg: TrainConfig) -> dict[str, Any] | None:
    """kohya's ss_bucket_info: the used buckets in (width, height) order, each with its number
    of images x repeats, and the mean |bucket aspect ratio - image aspect ratio| over the
    images (without repeats). None without buckets, as kohya writes it."""
    if not cfg.enable_buckets:
        return None
    counts: dict[tuple[int, int], int] = Counter()
    for it in items:
        counts[it.bucket] += it.repeats
    errors = [abs(it.bucket[0] / it.bucket[1] - it.size[0] / it.size[1]) for it in items]
    return {
        "buckets": {str(i): {"resolution": list(b), "count": counts[b]} for i, b in enumerate(sorted(counts))},
        "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0,
    }


def _tag_set(caption: str) -> str:
    """A caption's tags in sorted order: the same for every shuffle_tags() of it."""
    return ", ".join(sorted(t.strip() for t in caption.split(",") if t.strip()))


class CaptionTokens:
    """Token ids of captions in the family's chunks (77 = BOS + 75 + EOS, padded), prepared once;
    at most `family.max_chunks` chunks (225 tokens), longer captions are cut.

    `max_tokens` (75, 150 or 225: the max_token_length option; default: the family's most,
    `max_chunks` chunks) cuts longer captions; a caption takes as many chunks as it needs up to
    that (docs/training_loop.md compares this layout with kohya's). `shuffled`: captions arrive
    tag-shuffled (shuffle_caption), a new string nearly every step; caching them would only grow
    the cache, so nothing is cached, and a cut caption is remembered by its tags, so `truncated`
    counts captions, not shuffles. `encoder`: which of the family's text encoders the ids are for
    (its pad id may differ from the tokenizer's)."""

    def __init__(self, tokenizer: Any, shuffled: bool = False, family: ModelFamily = SD15, encoder: int = 0,
                 max_tokens: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.chunk_length = family.chunk_length
        self.per_chunk = family.tokens_per_chunk
        most = family.tokens_per_chunk * family.max_chunks
        self.max_tokens = most if max_tokens is None else min(max_tokens, most)
        pad = family.text_encoders[encoder].pad_token_id
        if pad is None:
            pad = getattr(tokenizer, "pad_token_id", None)
        self.pad = self.eos if pad is None else pad
        self.shuffled = shuffled
        self._cache: dict[str, list[list[int]]] = {}
        self.truncated: set[str] = set()

    def chunks(self, caption: str) -> list[list[int]]:
        hit = self._cache.get(caption)
        if hit is not None:
            return hit
        ids = self.tokenizer(caption, add_special_tokens=False, truncation=False, verbose=False).input_ids
        if len(ids) > self.max_tokens:
            self.truncated.add(_tag_set(caption) if self.shuffled else caption)
            ids = ids[: self.max_tokens]
        out = []
        for i in range(0, max(len(ids), 1), self.per_chunk):
            out.append(self._chunk(ids[i : i + self.per_chunk]))
        if not self.shuffled:
            self._cache[caption] = out
        return out

    def _chunk(self, ids: Sequence[int]) -> list[int]:
        c = [self.bos, *ids, self.eos]
        return c + [self.pad] * (self.chunk_length - len(c))

    def batch(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, n*77) ids; captions shorter than the batch's longest get empty chunks."""
        per = [self.chunks(c) for c in captions]
        n = max(len(p) for p in per)
        empty = self._chunk([])
        rows = [sum(p + [empty] * (n - len(p)), []) for p in per]
        return torch.tensor(rows, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    epoch: int
    items: list[Item]
    captions: list[str]
    flips: list[bool] = dataclasses.field(default_factory=list)  # per item (flip_aug); [] = none flipped

    def part(self, lo: int, hi: int) -> Batch:
        """Items lo..hi-1 as a batch of their own (the out-of-memory retry's halves)."""
        return Batch(self.epoch, self.items[lo:hi], self.captions[lo:hi], self.flips[lo:hi])

    def flipped(self, i: int) -> bool:
        return bool(self.flips) and self.flips[i]


def epoch_batches(items: list[Item], cfg: TrainConfig, epoch: int, seed: int) -> list[Batch]:
    """One epoch: every image `repeats` times, grouped per bucket into batches, in a seeded
    random order. A batch never mixes buckets. Each draw of an image gets its caption from
    `process_caption` and, under flip_aug, a coin toss for mirroring it (kohya's 50 %), all from
    the epoch's seeded generator: the same epoch always gives the same batches (exact resume)."""
    rng = random.Random(f"{seed}-{epoch}")
    by_bucket: dict[tuple[int, int], list[Item]] = {}
    for it in items:
        by_bucket.setdefault(it.bucket, []).extend([it] * it.repeats)
    batches: list[Batch] = []
    for bucket in sorted(by_bucket):
        pool = by_bucket[bucket]
        rng.shuffle(pool)
        for i in range(0, len(pool), cfg.batch_size):
            chunk = pool[i : i + cfg.batch_size]
            flips, caps = [], []
            for it in chunk:
                flips.append(it.settings.flip_aug and rng.random() < 0.5)
                caps.append(process_caption(it.caption, it.settings, epoch, rng))
            batches.append(Batch(epoch, chunk, caps, flips if any(flips) else []))
    rng.shuffle(batches)
    return batches


def iter_batches(items: list[Item], cfg: TrainConfig, total_steps: int, seed: int, start_step: int = 0) -> Iterator[Batch]:
    """Batches for steps start_step..total_steps-1, epoch after epoch."""
    step, epoch = 0, 0
    while step < total_steps:
        for b in epoch_batches(items, cfg, epoch, seed):
            if step >= total_steps:
                return
            if step >= start_step:
                yield b
            step += 1
        epoch += 1


# --------------------------------------------------------------------------------------------
# Latents


def vae_identity(backbone: Backbone) -> str:
    """Which VAE encoded a latent: a host-given id, else a hash of the VAE's weights, else the
    model file's hash. Part of the disk cache key, so a different VAE never reuses latents."""
    given = getattr(backbone, "vae_identity", None)
    if isinstance(given, str) and given:
        return given
    vae = getattr(backbone, "vae", None)
    h = hashlib.sha256(str(backbone.dtype).encode())
    if isinstance(vae, torch.nn.Module):
        with torch.no_grad():
            for name, t in sorted(vae.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()
    if backbone.model_hash:
        h.update(backbone.model_hash.encode())
        return h.hexdigest()
    return ""


def latent_key(item: Item, vae_id: str, flipped: bool = False) -> str:
    """The cache key of an image's latent in its bucket (and of its mirrored latent)."""
    flip = "|flip" if flipped else ""
    return hashlib.sha256(f"{item.digest}|{item.bucket[0]}x{item.bucket[1]}|{vae_id}{flip}".encode()).hexdigest()


def cache_latents(
    items: list[Item],
    backbone: Backbone,
    cache_dir: Path | None,
    progress: Progress | None = None,
    on_skip: Callable[[Path, str], None] | None = None,
    vae_id: str | None = None,
) -> dict[str, torch.Tensor]:
    """Encode every image once; {latent key: (4, h/8, w/8) fp32 CPU tensor}. With `cache_dir`,
    latents found there are reused and new ones written (one safetensors file per key).

    Each file is read once: its bytes give the item's digest (set here, in place) and, when no
    cached latent matches, are decoded. Images that fail to load now are reported, dropped
    from `items` (in place) and skipped. An image of a flip_aug subset also gets the latent of
    its mirror image (kohya encodes the flipped pixels too: a VAE latent is not mirrored exactly
    by flipping it), under its own key (`latent_key(..., flipped=True)`)."""
    from safetensors.torch import load_file, save_file

    from lib_lora.atomic import atomic_path
    from lib_lora.progress import check_cancel

    vae_id = vae_id if vae_id is not None else vae_identity(backbone)  # the caller may have it already
    disk = cache_dir if (cache_dir is not None and vae_id) else None
    if disk is not None:
        disk.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    bad: list[Item] = []
    for i, it in enumerate(items):
        check_cancel(progress)
        try:
            data = it.path.read_bytes()
        except OSError as err:
            bad.append(it)
            _report_skip(it.path, _unreadable(err), on_skip)
            continue
        it.digest = hashlib.sha256(data).hexdigest()
        pixels = None
        for flipped in (False, True) if it.settings.flip_aug else (False,):
            key = latent_key(it, vae_id, flipped)
            if key not in out and disk is not None and (disk / f"{key}.safetensors").is_file():
                try:
                    out[key] = load_file(str(disk / f"{key}.safetensors"))["latent"]
                except Exception:  # noqa: BLE001 - a damaged cache file is simply re-encoded
                    pass
            if key in out:
                continue
            if pixels is None:
                try:
                    pixels = to_pixels(fit_to_bucket(load_rgb(it.path, data), it.bucket))
                except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
                    bad.append(it)
                    _report_skip(it.path, _unreadable(err), on_skip)
                    break
            # The VAE samples its latent: seed it from the image's key, so a latent never
            # depends on which other images were encoded before it (determinism).
            dev = torch.device(backbone.device)
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.no_grad():
                torch.manual_seed(int(key[:15], 16))
                source = pixels.flip(-1) if flipped else pixels  # (3, H, W): mirrored left-right
                lat = backbone.encode_images(source.unsqueeze(0).to(backbone.device, backbone.dtype))
            lat = lat[0].detach().to("cpu", torch.float32).contiguous()
            out[key] = lat
            if disk is not None:
                with atomic_path(disk / f"{key}.safetensors") as tmp:
                    save_file({"latent": lat}, str(tmp))
        if progress is not None:
            progress.update(i + 1, len(items), "caching latents")
    for it in bad:
        items.remove(it)
    return out
