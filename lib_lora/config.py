"""The one config schema.

Every option is declared once, with its type, default, help text, bounds and UI group; the
CLI flags (`add_arguments`), validation (`validate`), presets, the UI's advanced controls,
the run's config file and the LoRA's metadata are all derived from these declarations.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_lora.errors import UserError, file_error, shown
from lib_lora.training.family import SD15, ModelFamily


def opt(
    default: Any,
    help: str,
    *,
    choices: typing.Sequence[Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    group: str = "advanced",
    cli: bool = True,
    path: str | None = None,
    names: typing.Sequence[str] = (),
) -> Any:
    """Declare a config field. `group` is 'basic' or 'advanced' (the UI collapses the latter).
    `path` marks a field that names a server path ('folder', 'file', or 'model' for either):
    a page or API request's value goes through the path policy (lib_lora.ui.paths); `names`
    are values of such a field that are not paths (a built-in model's name)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "group": group, "cli": cli,
            "path": path, "names": tuple(names)}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # get_type_hints evaluates every annotation of the class: once, not per field and request.
    return typing.get_type_hints(cls)


def field_type(cls: type, f: dataclasses.Field) -> tuple[type, bool]:
    """The base Python type of a field and whether it accepts None."""
    hint = _type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def flag_of(name: str) -> str:
    """A field's CLI flag (`dim` -> `--dim`): how the core's messages name an option, so that
    each front end can say it in its own words (`phrase_options`)."""
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: typing.Iterable[str] = ()) -> None:
    """Add one `--flag` per field of the dataclass `cls`. The flags keep the text as typed;
    `from_args` turns it into the field's type (`coerce`), so a bad value gets the same
    sentence as on the page and in the REST API."""
    skip = set(skip)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        typ, _ = field_type(cls, f)
        flag = flag_of(f.name)
        default = _default(f)
        help_text = f.metadata.get("help", "") + f" (default: {_family_default_text(f.name, default)})"
        if typ is bool:
            parser.add_argument(flag, nargs="?", const=True, default=None, help=help_text, metavar="true|false")
        elif typing.get_origin(typ) is list:
            parser.add_argument(flag, nargs="*", default=None, help=help_text)
        else:
            choices = f.metadata.get("choices")
            choices = [str(c) for c in choices] if choices else None
            parser.add_argument(flag, default=None, choices=choices, help=help_text)


def _family_default_text(name: str, default: Any) -> str:
    """A field's default as help text: per family where the families' defaults differ."""
    from lib_lora.training.family import FAMILIES

    values = {fam.label: fam.config_defaults().get(name, default) for fam in FAMILIES.values()}
    if len(set(map(str, values.values()))) == 1:
        return str(default)
    return ", ".join(f"{v} on {label}" for label, v in values.items()) + ": the base model's family decides"


# --------------------------------------------------------------------------------------------
# User input as the schema's types: the one conversion behind the CLI, the UI and the REST API

ON_WORDS = frozenset({"1", "true", "yes", "on"})
OFF_WORDS = frozenset({"0", "false", "no", "off"})
TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "text", list: "a list of text"}


def schema_field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise UserError(f"There is no option {name!r}.")


def coerce(cls: type, name: str, value: Any) -> Any:
    """`value` as field `name` of `cls` declares it: a form's or a CLI flag's text ('128',
    '1e-4', 'true', 'a, b'), a control's or a JSON body's value (12.0, true, null, a list),
    or a path. Empty (None or blank text) is None for an optional field ('none' too), '' for
    text, [] for a list, off for a switch; a number field needs a number. Raises UserError,
    one sentence naming the field by its flag, for a value of the wrong kind.

    Only the type is decided here: choices, bounds and finiteness are `validate`'s (a NaN
    float is a float, and gets validate's sentence); an integer NaN or infinity cannot be
    held, so it is refused here with the same words."""
    f = schema_field(cls, name)
    typ, optional = field_type(cls, f)
    flag = flag_of(f.name)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    blank = value is None or (isinstance(value, str) and value.strip() == "")
    if optional and (blank or (isinstance(value, str) and value.strip().lower() == "none")):
        return None
    if typ is bool:
        return _to_bool(flag, value)
    if is_record_list(typ):
        return _to_records(flag, value)
    if typing.get_origin(typ) is list:
        return _to_list(flag, value)
    if typ in (int, float):
        if blank:
            raise UserError(f"{flag} is empty: give {TYPE_WORDS[typ]}{_example(f)}.")
        return _to_int(flag, value, _default(f)) if typ is int else _to_float(flag, value)
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):  # {"lr": 1e-4} in a JSON body
            return repr(value)
        raise UserError(f"{flag} = {shown(value)} is not text.")
    raise TypeError(f"{cls.__name__}.{name}: no conversion for {typ!r}")  # a schema without a rule here


def coerce_fields(cls: type, values: typing.Mapping[str, Any]) -> dict[str, Any]:
    """`coerce` for each (field name, value)."""
    return {name: coerce(cls, name, value) for name, value in values.items()}


def _example(f: dataclasses.Field) -> str:
    default = _default(f)
    return f" such as {default}" if isinstance(default, int | float) and not isinstance(default, bool) else ""


def _to_bool(flag: str, value: Any) -> bool:
    if value is None:  # an unset checkbox
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ON_WORDS | OFF_WORDS:
        return value.strip().lower() in ON_WORDS
    raise UserError(f"{flag} = {shown(value)} is neither on nor off: give true or false.")


def is_record_list(typ: Any) -> bool:
    """A `list[dict]` field (subsets): its value is JSON objects, on the CLI and in a form."""
    return typing.get_origin(typ) is list and typing.get_args(typ) in ((dict,),)


def _to_records(flag: str, value: Any) -> list[dict[str, Any]]:
    """A list of objects from JSON text (one object or a list of them), a list of such texts
    (the CLI's words), or the objects themselves."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    items = value if isinstance(value, list | tuple) else [value]
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except ValueError:
                raise UserError(f"{flag} = {shown(value)} is not JSON: give objects such as "
                                '[{"image_dir": "folder", "repeats": 10}].') from None
        parts = item if isinstance(item, list) else [item]
        if not all(isinstance(p, dict) for p in parts):
            raise UserError(f"{flag} = {shown(value)}: each entry must be an object such as "
                            '{"image_dir": "folder", "repeats": 10}.')
        out.extend(dict(p) for p in parts)
    return out


def _to_list(flag: str, value: Any) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or any(isinstance(i, bool) or not isinstance(i, str | int | float)
                                                  for i in items):
        raise UserError(f"{flag} = {shown(value)} is not a list of text (give comma-separated words).")
    return [text for text in (str(i).strip() for i in items) if text]


def _to_int(flag: str, value: Any, default: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, str | float):
        raise UserError(f"{flag} = {shown(value)} is not a whole number.")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{flag} = {shown(value)} is not a whole number.") from None
    if not math.isfinite(number):
        raise UserError(not_finite(flag, value, default))
    if number != int(number):
        raise UserError(f"{flag} = {shown(value)} is not a whole number.")
    return int(number)


def _to_float(flag: str, value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise UserError(f"{flag} = {shown(value)} is not a number.")


def type_problem(cls: type, f: dataclasses.Field, value: Any) -> str | None:
    """Why `value` cannot be field `f`'s value (one sentence), or None when it can: what a config
    built in code is checked with (`TrainConfig(dim='128')`), front ends having used `coerce`."""
    typ, optional = field_type(cls, f)
    if value is None:
        return None if optional else f"{flag_of(f.name)} is empty: give {_type_words(typ)}."
    origin = typing.get_origin(typ)
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif typ is str:
        ok = isinstance(value, str)
    elif is_record_list(typ):
        ok = isinstance(value, list) and all(isinstance(i, dict) for i in value)
    elif origin is list:
        ok = isinstance(value, list) and all(isinstance(i, str) for i in value)
    else:
        return None
    if ok:
        return None
    return f"{flag_of(f.name)} = {shown(value)} is {_kind_of(value)}, not {_type_words(typ)}."


def _type_words(typ: Any) -> str:
    if is_record_list(typ):
        return "a list of objects"
    return TYPE_WORDS.get(typing.get_origin(typ) or typ, str(typ))


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, str):
        return "text"
    if isinstance(value, int | float | list):
        return TYPE_WORDS[list] if isinstance(value, list) else TYPE_WORDS[type(value) if type(value) in TYPE_WORDS else float]
    return f"a {type(value).__name__}"


# A CLI flag as the core's messages write it: `--upscale`, `--probe-max-steps`.
FLAG_RE = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")


def option_field(flag: str) -> dataclasses.Field | None:
    """The schema field a CLI flag name ('remove-bg') stands for, in any step's config."""
    name = flag.replace("-", "_")
    for cls in (PrepareConfig, TagConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f
    return None


def phrase_options(text: str, phrase: typing.Callable[[dataclasses.Field], str]) -> str:
    """`text` with each `--flag` of a schema field written as `phrase(field)`.

    The core names an option the way the CLI spells it (the flag is derived from the field,
    so it is a stable name); each other front end renders it in its own words: the UI as the
    control's label, the REST API as the JSON field. Flags of no field (the WebUI's own
    `--medvram`, pip's) are left as they are."""

    def one(m: re.Match) -> str:
        f = option_field(m[1])
        return m[0] if f is None else phrase(f)

    return FLAG_RE.sub(one, text)


def api_phrase(f: dataclasses.Field) -> str:
    """An option as the REST API's JSON body names it."""
    return f'"{f.name}"'


def from_args(cls: type, ns: argparse.Namespace, base: Any | None = None) -> Any:
    """A config from parsed CLI args; flags the user did not give keep `base`'s values."""
    cfg = base if base is not None else cls()
    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if getattr(ns, f.name, None) is not None}
    return validate(dataclasses.replace(cfg, **coerce_fields(cls, given)))


def validate(cfg: Any) -> Any:
    """Check the type, choices and bounds of every field; raise UserError naming the field and the fix."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):  # in any number field, int or float
            raise UserError(not_finite(f.name, value, _default(f)))
        problem = type_problem(type(cfg), f, value)
        if problem:
            raise UserError(problem)
        if value is None:
            continue
        problem = validate_one(type(cfg), f.name, value)
        if problem:
            raise UserError(problem)
    check = getattr(cfg, "check", None)
    if callable(check):
        check()
    return cfg


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def not_finite(name: str, value: Any, default: Any = None) -> str:
    """The sentence for a NaN or infinite number given to a field, whatever its type (it would
    reach the weights as NaN, or pass a bound check it should fail)."""
    example = f" such as {default}" if isinstance(default, int | float | str) and default not in ("", None) else ""
    return f"{name} = {value} is not a finite number (NaN and infinity are refused); give a number{example}."


def to_dict(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Inverse of to_dict; unknown keys (from a newer version) are ignored, missing ones default;
    a value of another kind (a hand-edited "128") is read as `coerce` reads it."""
    names = {f.name for f in dataclasses.fields(cls)}
    return validate(cls(**coerce_fields(cls, {k: v for k, v in data.items() if k in names})))


def save(cfg: Any, path: str | Path) -> None:
    from lib_lora.atomic import atomic_write_json

    atomic_write_json(path, to_dict(cfg))


def load(cls: type, path: str | Path) -> Any:
    return from_dict(cls, json.loads(Path(path).read_text(encoding="utf-8")))


# --------------------------------------------------------------------------------------------
# Prepare (steps 1-2): PrepareConfig goes here.

CROP_MODES = ["face", "center", "bucket", "none"]
BG_MODELS = ["none", "u2net", "u2netp", "isnet-anime", "birefnet-portrait"]


@dataclass
class PrepareConfig:
    name: str = opt("", "dataset name: names its folder and is the class token (any language)", group="basic")
    out: str = opt("work", "work folder; the training folder <out>/<name> is created inside it", group="basic",
                   path="folder")
    size: int = opt(512, "output side in pixels (square crops; the area for 'bucket' and 'none')", min=64, max=4096,
                    group="basic")
    crop: str = opt("face", "face: head-and-shoulders square around the main face; center: centre square; "
                    "bucket: keep the aspect, fit the nearest training bucket; none: whole image", choices=CROP_MODES,
                    group="basic")
    remove_bg: str = opt("none", "background removal: none, a rembg model name, or a path to a .onnx file",
                         group="basic", path="file", names=BG_MODELS)
    bg_color: str = opt("white", "colour the cut-out is put on: a name (white, grey) or #rrggbb", group="basic")
    keep_rgba: bool = opt(False, "also keep transparency: RGBA images plus a mask file in masks/ (training and tagging see them on "
                             "white; training's masked loss reads the masks)")
    repeats: int = opt(10, "how many times each image is seen per epoch (the tutorial: 30 for a person)", min=1, max=10000, group="basic")
    recursive: bool = opt(False, "also import images from sub-folders")
    upscale: bool = opt(False, "enlarge images smaller than the output size (off: small images stay small)")
    workers: int = opt(0, "worker processes (0 = all CPU cores)", min=0, max=256)
    model_dir: str = opt("", "folder of background-removal models (default: rembg's, $U2NET_HOME or ~/.u2net)",
                         path="folder")
    download: bool = opt(True, "download a missing background-removal model (rembg's release files)")
    face_model: str = opt("", "YuNet face model .onnx (default: face_detection_yunet*.onnx in model_dir if "
                          "present, else OpenCV's Haar cascades)", path="file")

    def check(self) -> None:
        if self.remove_bg not in BG_MODELS and not self.remove_bg.lower().endswith(".onnx"):
            raise UserError(
                f"remove_bg = {shown(self.remove_bg)}: use one of {', '.join(BG_MODELS)} or a path to a .onnx model file."
            )
        from PIL import ImageColor

        try:
            ImageColor.getrgb(self.bg_color)
        except ValueError:
            raise UserError(f"bg_color = {shown(self.bg_color)} is not a colour: use a name such as white or grey, "
                            "or #rrggbb.") from None



# --------------------------------------------------------------------------------------------
# Tagging (steps 3-4): TagConfig goes here.


TAGGERS = ["deepdanbooru", "wd14", "webui"]
TAG_PRESETS = ["person", "character", "style", "object", "none"]


@dataclass
class TagConfig:
    # Step 3: automatic tagging
    tagger: str = opt("deepdanbooru", "tagger: deepdanbooru (the tutorial's), wd14, or webui (the WebUI's built-in Deepbooru)",
                      choices=TAGGERS, group="basic")
    model: str = opt("", "tagger model: an .onnx file or its folder (empty: the tagger's own cache folder); "
                         "for wd14 also a hub repo id such as SmilingWolf/wd-swinv2-tagger-v3", path="model")
    tags_file: str = opt("", "the model's tag list (DeepDanbooru tags.txt, WD14 selected_tags.csv); empty: beside the model",
                         path="file")
    general_threshold: float | None = opt(None, "score a tag needs to be written (empty: 0.5 for DeepDanbooru, 0.35 for WD14)",
                                          min=0, max=1, group="basic")
    character_threshold: float = opt(0.85, "score a WD14 character tag needs to be written", min=0, max=1)
    score_floor: float = opt(0.05, "scores above this are kept in the sidecar, so a lower threshold later needs no re-run",
                             min=0, max=1)
    sort: str = opt("score", "order of the tags in a caption", choices=["score", "alphabetical"])
    trigger: str = opt("", "trigger word written first in every caption (empty: the LoRA's name from the folder)", group="basic")
    keep_underscores: bool = opt(False, "keep underscores in tags (normally long_hair becomes 'long hair')")
    max_tags: int = opt(0, "at most this many tags per caption, best first (0 = no limit)", min=0, max=500)
    existing: str = opt("overwrite", "what to do with an image that already has a caption (overwriting can be undone)",
                        choices=["overwrite", "skip", "merge"])
    match_background: bool = opt(True, "when the prepare step removed backgrounds, write matching background tags")
    batch_size: int = opt(4, "images per tagger call", min=1, max=256)
    device: str = opt("auto", "where the ONNX taggers run", choices=["auto", "cpu", "cuda"])
    allow_download: bool = opt(True, "download a missing tagger model (off: only use files already on disk)")
    # Step 4: tag rules
    preset: str = opt("person", "tag rules: person, character, style, object, or none", choices=TAG_PRESETS, group="basic")
    blacklist: list[str] = opt([], "tags always removed by the rules")
    whitelist: list[str] = opt([], "tags the rules never remove")
    implications_file: str = opt("", "extra implication table, one 'specific > general' per line", path="file")
    aliases_file: str = opt("", "extra aliases, one 'alias > tag' per line", path="file")

    def check(self) -> None:
        if self.trigger:
            if "," in self.trigger:
                raise UserError(f"trigger = {shown(self.trigger)}: a trigger word cannot contain a comma.")
        for path_field in ("implications_file", "aliases_file"):
            value = getattr(self, path_field)
            try:
                missing = bool(value) and not Path(value).is_file()
            except OSError as err:  # a path over the system's length limit
                raise file_error(err, value, f"use the {path_field}") from None
            if missing:
                raise UserError(f"{path_field} = {shown(value)} does not exist; give an existing text file.")

    def caption_threshold(self) -> float:
        """The general threshold in effect: the field, or the tagger's customary default."""
        if self.general_threshold is not None:
            return self.general_threshold
        return 0.35 if self.tagger == "wd14" else 0.5

    def tagger_floor(self) -> float:
        """The lowest score the tagger must report: the sidecar's floor, lowered to any threshold a
        caption uses (a tag the tagger dropped below the floor could never reach a caption)."""
        return min(self.score_floor, self.caption_threshold(), self.character_threshold)


# --------------------------------------------------------------------------------------------
# Training

# The keys of one `subsets` entry (kohya's dataset-config subset, `repeats` for num_repeats):
# image_dir, then the run-level options it may override.
SUBSET_KEYS = ("image_dir", "repeats", "is_reg", "class_tokens", "caption_extension", "keep_tokens",
               "keep_tokens_separator", "shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
               "caption_tag_dropout_rate", "caption_prefix", "caption_suffix", "flip_aug")


@dataclass
class TrainConfig:
    # What and where
    name: str = opt("", "LoRA name: the output file's name and the trigger word (Unicode allowed)", group="basic")
    dataset: str = opt("", "the folder of training images (the one Prepare made)", group="basic",
                       path="folder")
    base_model: str = opt("tiny", "SD1.5 or SDXL single-file checkpoint, diffusers folder, or 'tiny' / 'tiny-sdxl' (built-in)",
                          group="basic",
                          path="model", names=("tiny", "tiny-sdxl"))
    output_dir: str = opt("output", "where the final LoRA (.safetensors) is written", group="basic", path="folder")
    run_dir: str = opt("", "folder for the run's config, logs, checkpoints and state (default: runs/<name>)",
                       path="folder")
    overwrite: bool = opt(False, "replace an existing LoRA file of the same name")
    # Data
    repeats: int = opt(10, "how many times each image is seen per epoch; a subfolder named like 10_name keeps its own number", min=1, max=10000, group="basic")
    class_tokens: str = opt("", "caption for images without one (default: the folder's name)")
    caption_extension: str = opt(".txt", "caption file extension", choices=[".txt", ".caption"])
    resolution: int = opt(SD15.default_resolution, "training resolution (square side; buckets keep its area)", min=64, max=2048, group="basic")
    enable_buckets: bool = opt(True, "group images into aspect-ratio buckets instead of square crops")
    bucket_no_upscale: bool = opt(True, "never upscale small images to fill a bucket")
    bucket_reso_steps: int = opt(64, "bucket sides are multiples of this", min=8, max=256)
    min_bucket_reso: int = opt(SD15.bucket_range[0], "smallest bucket side", min=64, max=2048)
    max_bucket_reso: int = opt(SD15.bucket_range[1], "largest bucket side", min=64, max=4096)
    shuffle_caption: bool = opt(False, "shuffle comma-separated tags after the first keep_tokens")
    keep_tokens: int = opt(1, "tags kept in place at the start of the caption (the trigger word)", min=0, max=255)
    keep_tokens_separator: str = opt("", "text in a caption that ends its kept part (kohya's, e.g. |||), instead of "
                                     "counting keep_tokens; a second one starts a kept ending")
    caption_prefix: str = opt("", "text put before every caption (before keep_tokens counts)")
    caption_suffix: str = opt("", "text put after every caption")
    caption_dropout_rate: float = opt(0.0, "probability that an image is trained with an empty caption", min=0, max=1)
    caption_dropout_every_n_epochs: int = opt(0, "train every N-th epoch with empty captions (0 = off)", min=0)
    caption_tag_dropout_rate: float = opt(0.0, "probability that each tag after the kept ones is left out", min=0, max=1)
    flip_aug: bool = opt(False, "train each image mirrored left-right half of the time (not for asymmetric "
                         "subjects: text, a side parting)")
    reg_data_dir: str = opt("", "folder of regularisation (class) images, in <repeats>_<class> subfolders or plain; "
                            "repeated to match the training images each epoch", path="folder")
    prior_loss_weight: float = opt(1.0, "loss weight of the regularisation images", min=0)
    subsets: list[dict] = opt([], "several image folders, each with its own repeats and caption settings: a JSON "
                              "list of objects with image_dir and any of " + ", ".join(SUBSET_KEYS[1:]) +
                              " (a missing key takes the option's value; empty: the dataset folder)",
                              path="folder")
    max_token_length: int = opt(225, "caption tokens kept (75 per 77-token chunk of the text encoder); "
                                "longer captions are cut", choices=[75, 150, 225])
    cache_latents_to_disk: bool = opt(True, "also keep cached latents on disk for the next run")
    # Steps
    epochs: int = opt(1, "epochs", min=1, max=100000, group="basic")
    max_steps: int | None = opt(None, "stop after this many steps (default: from epochs)", min=1, group="basic")
    batch_size: int = opt(1, "images per step", min=1, max=256, group="basic")
    # Network
    dim: int = opt(128, "LoRA rank (network dim)", min=1, max=1024, group="basic")
    alpha: float = opt(64.0, "LoRA alpha; the update is scaled by alpha/dim", min=0, group="basic")
    conv_dim: int = opt(0, "rank of the optional 3x3 conv LoRA (0 = off)", min=0, max=1024)
    conv_alpha: float = opt(1.0, "alpha of the conv LoRA", min=0)
    network_dropout: float = opt(0.0, "dropout on the LoRA's hidden units (LoCon, LoHa: on the module's output; LoKr, DoRA: none)",
                                 min=0, max=1)
    rank_dropout: float = opt(0.0, "rank dropout while training: LoRA drops each rank per image with this "
                              "probability and scales the rest up (kohya's); LyCORIS types use LyCORIS's own", min=0, max=1)
    module_dropout: float = opt(0.0, "module dropout while training: each LoRA module sits a step out with this "
                                "probability", min=0, max=1)
    network_type: str = opt(
        "lora", "lora: kohya's LoRA; through LyCORIS: locon (LoRA that also trains the 3x3 convs at the conv dim), "
        "loha (Hadamard product), lokr (Kronecker product), dora (weight-decomposed LoRA)",
        choices=["lora", "locon", "loha", "lokr", "dora"],
    )
    lokr_factor: int = opt(-1, "LoKr: the factor its Kronecker product splits each layer by (-1: as even as possible)",
                           min=-1, max=1024)
    train_unet: bool = opt(True, "train the U-Net LoRA")
    train_text_encoder: bool = opt(True, "train the text-encoder LoRA (SDXL: both encoders)")
    # Optimisation
    lr: str = opt("1e-4", "U-Net learning rate: a number, or 'auto' to probe it first", group="basic")
    text_encoder_lr: float | None = opt(None, "text-encoder learning rate (default: lr x te_lr_ratio)", min=0)
    te_lr_ratio: float = opt(0.1, "text-encoder lr as a fraction of the U-Net lr", min=0, max=10)
    optimizer: str = opt(
        "adamw8bit", "optimizer", choices=["adamw8bit", "adamw", "dadaptation", "prodigy"], group="basic"
    )
    weight_decay: float = opt(0.01, "AdamW weight decay", min=0)
    # LR probe (lr = auto; training/probe.py)
    probe_optimizer: str = opt("dadaptation", "adaptive optimizer the lr probe reads d x lr from", choices=["dadaptation", "prodigy"])
    probe_fraction: float = opt(0.05, "lr probe step budget as a fraction of the run's steps", min=0, max=1)
    probe_min_steps: int = opt(30, "lr probe budget floor (steps)", min=1)
    probe_max_steps: int = opt(300, "lr probe budget cap (steps)", min=1)
    probe_window: int = opt(10, "the probe stops when d x lr moved less than probe_tolerance over this many steps", min=2)
    probe_tolerance: float = opt(0.01, "relative change of d x lr below which the probe counts it settled", min=0, max=1)
    lr_scheduler: str = opt(
        "constant_with_warmup",
        "learning-rate schedule",
        choices=["constant", "constant_with_warmup", "cosine", "linear"],
    )
    lr_warmup_steps: float = opt(0.0, "warm-up steps (a value below 1 is a fraction of all steps)", min=0)
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)", min=0)
    noise_offset: float = opt(0.0, "noise offset (0.05-0.1 helps very dark/bright images)", min=0, max=1)
    min_snr_gamma: float | None = opt(None, "min-SNR-gamma loss weighting (5 is common; empty = off)", min=0)
    # Loss and noise: kohya's options of the same names (training/loss.py, training/noise.py)
    v_parameterization: bool = opt(False, "the base model predicts v (velocity), as SD2-768-v and v-prediction "
                                   "fine-tunes do: the loss target is v; wrong for an ordinary epsilon model")
    zero_terminal_snr: bool = opt(False, "rescale the noise schedule to zero SNR at the last timestep, for "
                                  "v-prediction fine-tunes trained that way (with v_parameterization on)")
    loss_type: str = opt("l2", "loss: l2 (squared error), l1, huber or smooth_l1 (both less swayed by outliers; "
                         "see huber_schedule)", choices=["l2", "l1", "huber", "smooth_l1"])
    huber_schedule: str = opt("snr", "huber / smooth_l1 threshold over the timesteps: constant (huber_c), exponential "
                              "(1 down to huber_c) or snr (from the noise level)", choices=["constant", "exponential", "snr"])
    huber_c: float = opt(0.1, "huber / smooth_l1 threshold (the schedules' value at high noise)", min=0, max=1)
    min_timestep: int = opt(0, "train timesteps from this one (0-999)", min=0, max=999)
    max_timestep: int = opt(1000, "train timesteps below this one (1-1000)", min=1, max=1000)
    multires_noise_iterations: int = opt(0, "multires (pyramid) noise octaves (0 = off; 6-10 is usual)", min=0, max=64)
    multires_noise_discount: float = opt(0.3, "weight of each coarser multires octave", min=0, max=1)
    noise_offset_random_strength: bool = opt(False, "draw the noise offset's strength each step, uniform in 0..noise_offset")
    masked_loss: bool = opt(False, "count the loss only where the subject is: the masks Prepare writes into masks/ "
                            "when it removes backgrounds and keeps transparency (else an image's own alpha)")
    clip_skip: int = opt(1, "use the text encoder's N-th last layer (2 for anime models)", min=1, max=12)
    # Machine
    mixed_precision: str = opt("auto", "auto: fp16 on CUDA, fp32 on CPU", choices=["auto", "fp16", "bf16", "no"])
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    seed: int = opt(42, "random seed (same seed, same data, same machine: same LoRA)", min=0)
    gradient_checkpointing: bool = opt(False, "trade compute for memory")
    # Speed (issue 8): see docs/speed.md for what each one measured
    cache_text_encoder_outputs: bool = opt(True, "encode each caption once when the text encoder is not trained")
    channels_last: bool = opt(False, "channels_last U-Net weights and inputs (GPU; measure before keeping it on)")
    compile_unet: bool = opt(False, "torch.compile the U-Net step (slow first steps; one recompile per bucket)")
    # Saving and logging
    save_precision: str = opt("fp16", "precision of the saved LoRA weights", choices=["fp16", "bf16", "fp32"])
    save_every_n_steps: int = opt(0, "also save an intermediate LoRA every N steps (0 = off)", min=0)
    save_every_n_epochs: int = opt(0, "also save an intermediate LoRA every N epochs (0 = off)", min=0)
    log_every_n_steps: int = opt(10, "write TensorBoard scalars every N steps (the live chart reads the loss at least 50 times a run)", min=1)
    comment: str = opt("", "free text stored in the LoRA's metadata")
    # Sample images during the run (shown in the Train tab as they are made; see training/sample.py)
    sample_images: int = opt(0, "make sample images this many times, evenly spaced, the last at the end (0 = off)",
                             min=0, max=100)
    sample_every_n_steps: int = opt(0, "also make sample images every N steps (0 = off)", min=0)
    sample_every_n_epochs: int = opt(0, "also make sample images every N epochs (0 = off)", min=0)
    sample_prompts: str = opt("", "sample prompts separated by '|'; {trigger} is the trigger word (empty: the trigger word)")
    sample_negative_prompt: str = opt("", "negative prompt of the sample images")
    sample_steps: int = opt(20, "DDIM steps per sample image", min=1, max=150)
    sample_cfg_scale: float = opt(7.0, "guidance scale of the sample images", min=1, max=30)
    # Reliability (issue 5): resume, numerical guards, out-of-memory
    restart: bool = opt(False, "discard the run's saved state and start over (default: resume where it stopped)")
    state_every_n_steps: int = opt(50, "save the resumable state every N steps (0 = only on stop and at the end)", min=0)
    max_nonfinite_steps: int = opt(20, "stop after this many steps in a row with NaN/inf loss or gradients", min=1)
    oom_retry: bool = opt(True, "on GPU out-of-memory, retry with gradient checkpointing, then with the batch in halves (one optimizer step)")

    def check(self) -> None:
        if self.lr != "auto":
            try:
                value = float(self.lr)
            except ValueError:
                raise UserError(f"lr = {shown(self.lr)}: give a number such as 1e-4, or 'auto'.") from None
            if not math.isfinite(value):
                raise UserError(not_finite("lr", self.lr, "1e-4"))
            if value <= 0:
                raise UserError(f"lr = {self.lr}: the learning rate must be positive.")
        if self.rank_dropout >= 1:
            raise UserError(f"rank_dropout = {self.rank_dropout}: that drops every rank; give a value below 1 (0.1 is common).")
        if self.min_bucket_reso > self.max_bucket_reso:
            raise UserError("min_bucket_reso is larger than max_bucket_reso.")
        if not (self.train_unet or self.train_text_encoder):
            raise UserError("Nothing to train: enable train_unet or train_text_encoder.")
        if self.min_timestep > self.max_timestep:
            raise UserError(f"min_timestep = {self.min_timestep} is above max_timestep = {self.max_timestep}; "
                            "lower it or raise max_timestep.")
        if self.loss_type in ("huber", "smooth_l1") and self.huber_c <= 0:
            raise UserError(f"huber_c = {self.huber_c}: the {self.loss_type} loss needs a positive threshold "
                            "such as 0.1.")
        self.subsets = [subset_entry(self, i, entry) for i, entry in enumerate(self.subsets)]

    @property
    def unet_lr_value(self) -> float | None:
        """The U-Net lr as a number, or None while it is still 'auto'."""
        return None if self.lr == "auto" else float(self.lr)


def subset_entry(cfg: TrainConfig, index: int, entry: Mapping[str, Any]) -> dict[str, Any]:
    """One `subsets` entry checked and typed: image_dir required, other keys among SUBSET_KEYS,
    each value as (and within the bounds of) the run-level option of that name."""
    where = f"subsets entry {index + 1}"
    unknown = [k for k in entry if k not in SUBSET_KEYS]
    if unknown:
        raise UserError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; "
                        f"use {', '.join(SUBSET_KEYS)}.")
    image_dir = entry.get("image_dir")
    if not isinstance(image_dir, str) or not image_dir.strip():
        raise UserError(f"{where} has no image_dir: give the folder of its images.")
    out: dict[str, Any] = {"image_dir": image_dir}
    for key, value in entry.items():
        if key == "image_dir":
            continue
        if key == "is_reg":
            out[key] = _to_bool(f"{where}: is_reg", value)
            continue
        typed = coerce(type(cfg), key, value)
        single = validate_one(type(cfg), key, typed)
        if single:
            raise UserError(f"{where}: {single}")
        out[key] = typed
    return out


def validate_one(cls: type, name: str, value: Any) -> str | None:
    """Why `value` breaks field `name`'s choices or bounds (one sentence), or None."""
    f = schema_field(cls, name)
    if isinstance(value, float) and not math.isfinite(value):
        return not_finite(name, value, _default(f))
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        return f"{name} = {shown(value)} is not one of: {', '.join(map(str, choices))}."
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if lo is not None and value < lo:
            return f"{name} = {value} is below its minimum {lo}."
        if hi is not None and value > hi:
            return f"{name} = {value} is above its maximum {hi}."
    return None


# Presets fill the recipe for a kind of LoRA; the tutorial's recipe is `person`. They are
# facts of the model family (lib_lora.training.family); these are SD1.5's.
PRESETS: Mapping[str, Mapping[str, Any]] = SD15.presets


def apply_preset(cfg: TrainConfig, preset: str, family: ModelFamily = SD15) -> TrainConfig:
    """`cfg` with the family's recipe `preset` filled in (the other fields as they are)."""
    presets = family.presets
    if preset not in presets:
        raise UserError(f"Unknown preset {shown(preset)}; choose one of {', '.join(presets)}.")
    return validate(dataclasses.replace(cfg, **presets[preset]))


def changed_fields(cfg: TrainConfig) -> frozenset[str]:
    """The fields where `cfg` differs from TrainConfig's defaults: what a config built in code
    tells of the values its caller chose (a front end knows them: `for_family`'s `given`)."""
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) != _default(f))


def for_family(cfg: TrainConfig, family: ModelFamily, given: typing.Iterable[str] | None = None,
               preset: str | None = None) -> TrainConfig:
    """The config a request trains on a model of `family`: the family's defaults (SDXL: 1024 px,
    its buckets, U-Net only), then the family's recipe `preset`, then the fields the user gave
    (`given`, their values taken from `cfg`), so a value the user chose is kept even where it
    equals SD1.5's default (512 px on SDXL). `given` None: the fields where `cfg` differs from
    TrainConfig's defaults (`changed_fields`). On SD1.5 with no preset, `cfg` comes back as it is."""
    names = changed_fields(cfg) if given is None else frozenset(given)
    unknown = names - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise UserError(f"Unknown training option(s): {', '.join(sorted(unknown))}.")
    base = dataclasses.replace(TrainConfig(), **family.config_defaults())
    if preset:
        base = apply_preset(base, preset, family)
    return validate(dataclasses.replace(base, **{n: getattr(cfg, n) for n in names}))
