"""User presets: a recipe saved under a name, listed beside the built-in ones (person,
character, style, ...). One TOML file per preset in `<work folder>/presets/`, written in our
config format (so a preset is also a config file `train --config` reads); names go through the
same policy as LoRA names, and a write is atomic.

A preset holds the recipe, not the run: the LoRA's name, its images and where the run and the
LoRA go are left out, so one preset serves many datasets.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lib_lora.config import PRESETS, TrainConfig, to_dict
from lib_lora.config_files import ConfigFile, read_config_file, toml_dumps
from lib_lora.errors import UserError, file_error
from lib_lora.names import validate_name

FOLDER = "presets"
SUFFIX = ".toml"
# What a run is about rather than how it trains: never part of a preset.
RUN_FIELDS = ("name", "dataset", "subsets", "reg_data_dir", "run_dir", "output_dir", "restart", "overwrite")


def presets_dir(work_dir: str | Path) -> Path:
    return Path(work_dir) / FOLDER


def preset_name(name: str) -> str:
    """The name checked (the LoRA-name policy), refused when it is a built-in preset's."""
    name = validate_name(name or "", "preset name")
    if name.lower() in {p.lower() for p in PRESETS}:
        raise UserError(f"{name} is a built-in preset; give yours another name.")
    return name


def recipe_values(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg).items() if k not in RUN_FIELDS}


def save_preset(folder: str | Path, name: str, cfg: TrainConfig) -> Path:
    """Write `cfg`'s recipe as the preset `name` (replacing a preset of that name)."""
    from lib_lora.atomic import atomic_write_text

    name = preset_name(name)
    path = Path(folder) / f"{name}{SUFFIX}"
    comments = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig)}
    text = toml_dumps(recipe_values(cfg), comments, header=f"Fast LoRA preset {name!r}")
    try:
        atomic_write_text(path, text)
    except OSError as err:
        raise file_error(err, path, "write") from None
    return path


def list_presets(folder: str | Path) -> list[str]:
    """The user presets in `folder`, by name (files whose names the policy refuses are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = []
    for p in sorted(folder.glob(f"*{SUFFIX}")):
        try:
            names.append(preset_name(p.stem))
        except UserError:
            continue  # a temporary file, a hand-made name we would not write
    return names


def read_preset(folder: str | Path, name: str) -> ConfigFile:
    """The preset's values (our config format: an unknown option is refused by name)."""
    name = preset_name(name)
    path = Path(folder) / f"{name}{SUFFIX}"
    if not path.is_file():
        known = ", ".join([*PRESETS, *list_presets(folder)])
        raise UserError(f"There is no preset {name!r}; choose one of {known}.")
    cf = read_config_file(path)
    run = [k for k in cf.values if k in RUN_FIELDS]
    for k in run:  # a hand-edited preset naming a dataset: a preset never picks the run's data
        cf.values.pop(k)
    if run:
        cf.notes.append(f"The preset {name!r} sets {', '.join(run)}, which belong to a run, not a preset: not used.")
    return cf
