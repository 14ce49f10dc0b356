"""Training configs as files: our TOML (or the run folder's config.json), and kohya's files
read through `lib_lora.kohya_config`.

A file's values go through the schema's own `coerce` and `validate`, the path CLI flags take,
so a bad value gets the same sentence as the flag, with the file's name in front.

Reading TOML: Python 3.11+ has `tomllib`; on 3.10 (A1111 v1.10's Python) `tomli` when it is
there, else `toml`, which lycoris-lora (one of our requirements) already installs, so no
version of anything the host pins is touched. Writing: a small writer of our own, because a
config holds only flat scalars, lists of text and one list of tables (`subsets`), and each
field gets its help text as a comment above it (no TOML writer package does comments).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib_lora.config import TrainConfig, coerce, phrase_options, to_dict, validate
from lib_lora.errors import UserError, file_error, shown

FORMATS = ("fastlora", "kohya_ss", "sd-scripts", "sd-scripts-dataset")
# The one key of a run folder's config.json that is not an option (see ConfigFile.processes).
PROCESSES_KEY = "processes"


@dataclass
class ConfigFile:
    """What a config file says, as our fields: `values` (field -> value as written, coerced
    later with the flags), the format it was read as, and what it held that we cannot use."""

    path: Path
    format: str
    values: dict[str, Any]
    unsupported: list[str] = field(default_factory=list)  # "key = value", as the file spells them
    notes: list[str] = field(default_factory=list)  # values taken in a nearby form (a non-square resolution)
    # A run folder's config.json of a data-parallel run says how many processes trained it:
    # its batch_size is then that run's global batch, not a per-process one (file_config).
    processes: int | None = None

    def report(self) -> str:
        """One message naming every key that is not used, then the notes; '' when all was used."""
        lines = []
        if self.unsupported:
            lines.append(f"Not supported here, so not used from {self.path.name}: {', '.join(self.unsupported)}.")
        lines.extend(self.notes)
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ reading


def toml_loads(text: str, backend: str | None = None) -> dict[str, Any]:
    """Parse TOML text with `tomllib`, `tomli` or `toml` (the first present, or `backend`)."""
    import importlib

    names = [backend] if backend else ["tomllib", "tomli", "toml"]
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        return module.loads(text)
    raise UserError("Reading a .toml config needs the tomli package on this Python; install it with "
                    "`pip install tomli`, or use a .json config.")


def read_data(path: str | Path) -> dict[str, Any]:
    """The file's table (TOML by default, JSON for .json) or one sentence saying why not."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"The config file {path} is not UTF-8 text; save it as UTF-8.") from None
    except OSError as err:
        raise file_error(err, path, "read") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else toml_loads(text)
    except UserError:
        raise
    except Exception as err:  # tomllib.TOMLDecodeError, json.JSONDecodeError, toml's TomlDecodeError
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise UserError(f"The config file {path} is not valid {kind} ({err}); fix that line.") from None
    if not isinstance(data, dict):
        raise UserError(f"The config file {path} does not hold a table of options; give a config file.")
    return data


def our_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def detect(data: Mapping[str, Any], path: Path) -> str:
    """Which format `data` is written in: ours (every key a field of ours), sd-scripts'
    --dataset_config ([general], [[datasets]]), or kohya's argument files (any key that is
    kohya's and not ours): the kohya_ss GUI's .json or sd-scripts' --config_file .toml."""
    from lib_lora.kohya_config import kohya_keys

    if isinstance(data.get("datasets"), list) or isinstance(data.get("general"), dict):
        return "sd-scripts-dataset"
    if any(isinstance(v, dict) for v in data.values()):  # sd-scripts' sections ([model_arguments])
        return "sd-scripts"
    ours = our_fields()
    if any(k in kohya_keys() and k not in ours for k in data):
        return "kohya_ss" if path.suffix.lower() == ".json" else "sd-scripts"
    return "fastlora"


def read_config_file(path: str | Path) -> ConfigFile:
    """A config file of any supported format as our fields. Our own format refuses keys that
    are not fields (one sentence naming them); kohya's report them in `unsupported`."""
    path = Path(path)
    data = read_data(path)
    kind = detect(data, path)
    if kind != "fastlora":
        from lib_lora.kohya_config import import_kohya

        return import_kohya(data, kind, path)
    fields = our_fields()
    data = dict(data)
    processes = data.pop(PROCESSES_KEY, None)
    if processes is not None and (isinstance(processes, bool) or not isinstance(processes, int) or processes < 1):
        raise UserError(f"The config file {path} has {PROCESSES_KEY} = {processes!r}; it is the process count a run "
                        "folder's config.json records (a whole number, 1 or more), so fix or remove it.")
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise UserError(f"The config file {path} has option{'s' if len(unknown) > 1 else ''} Fast LoRA does not "
                        f"know: {', '.join(unknown)}; check the spelling (train --help lists every option).")
    return ConfigFile(path, kind, data, processes=processes)


def per_process_batch(cf: ConfigFile, batch: int, world: int) -> int:
    """The share of a recorded global batch each of `world` processes trains."""
    if batch % world:
        raise UserError(f"{cf.path.name} holds a global batch of {batch} (trained on {cf.processes} processes), which "
                        f"does not split over {world} processes; run a number of processes that divides {batch}, "
                        "or pass --batch-size (per process).")
    return batch // world


def file_config(files: list[ConfigFile], base: TrainConfig, world: int = 1) -> TrainConfig:
    """`base` with the files' values (later files win), each coerced and validated as a flag
    is; a bad value's sentence names the file and the option as the file spells it.

    `world`: the processes this command runs as (a launcher's). A file's batch_size is per
    process, as --batch-size is, except in a data-parallel run's config.json (`processes`
    given): there it is the run's global batch, which is kept, so each of the `world`
    processes takes its share of it (training/distributed.py multiplies it back)."""
    cfg = base
    for cf in files:
        try:
            values = {k: coerce(TrainConfig, k, v) for k, v in cf.values.items()}
        except UserError as err:
            raise UserError(f"In {cf.path.name}: {phrase_options(str(err), lambda f: f.name)}") from None
        if cf.processes is not None and world > 1 and isinstance(values.get("batch_size"), int):
            values["batch_size"] = per_process_batch(cf, values["batch_size"], world)
        try:
            cfg = validate(dataclasses.replace(cfg, **values))
        except UserError as err:
            raise UserError(f"In {cf.path.name}: {phrase_options(str(err), lambda f: f.name)}") from None
    return cfg


# ------------------------------------------------------------------------------------ writing

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _string(k)


def _string(s: str) -> str:
    # JSON's escapes are TOML's (\" \\ \n \t \uXXXX); TOML also refuses a raw DEL.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if v is None:  # TOML has no null: empty text reads back as "not set" for an optional field
        return '""'
    if isinstance(v, list | tuple) and all(not isinstance(i, dict) for i in v):
        return "[" + ", ".join(toml_value(i) for i in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def toml_dumps(values: Mapping[str, Any], comments: Mapping[str, str] | None = None, header: str = "") -> str:
    """TOML for a flat table whose values are scalars, lists of scalars or lists of tables
    of scalars (written last, as [[key]] sections). `comments` go above their key."""
    comments = comments or {}
    lines = [f"# {line}" for line in header.splitlines()] + ([""] if header else [])
    tables = {k: v for k, v in values.items() if isinstance(v, list) and v and all(isinstance(i, dict) for i in v)}
    for k, v in values.items():
        if k in tables:
            continue
        if comments.get(k):
            lines.append(f"# {comments[k]}")
        lines.append(f"{_key(k)} = {toml_value(v)}")
    for k, rows in tables.items():
        if comments.get(k):
            lines.append(f"# {comments[k]}")
        for row in rows:
            lines += ["", f"[[{_key(k)}]]"] + [f"{_key(rk)} = {toml_value(rv)}" for rk, rv in row.items()]
    return "\n".join(lines) + "\n"


def config_text(cfg: TrainConfig, suffix: str = ".toml", header: str = "") -> str:
    """Every field of `cfg` as our TOML (each with its help text) or, for .json, as the run
    folder's config.json is written."""
    values = to_dict(cfg)
    if suffix.lower() == ".json":
        return json.dumps(values, indent=2, ensure_ascii=False) + "\n"
    comments = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig)}
    return toml_dumps(values, comments, header)


def is_our_config(path: Path) -> bool:
    try:
        return detect(read_data(path), path) == "fastlora"
    except UserError:
        return False


def save_config_file(cfg: TrainConfig, path: str | Path, header: str = "") -> Path:
    """Write `cfg` to `path` atomically (.toml, or .json). An existing file is replaced only
    when it is a Fast LoRA config itself: a kohya file or anything else is left as it is."""
    from lib_lora.atomic import atomic_write_text

    path = Path(path)
    if path.suffix.lower() not in (".toml", ".json"):
        raise UserError(f"Save the config as a .toml (or .json) file, not {shown(path.name)}.")
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name such as {path / 'run.toml'}.")
    if path.exists() and not is_our_config(path):
        raise UserError(f"{path} already exists and is not a Fast LoRA config; choose another file name.")
    try:
        atomic_write_text(path, config_text(cfg, path.suffix, header))
    except OSError as err:
        raise file_error(err, path, "write") from None
    return path
