"""The core steps the tabs call, imported lazily.

The pieces land one by one; a tab whose step cannot be imported shows what is missing (the
module and the reason) instead of a fake.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass
class Missing:
    what: str  # the step, for people
    module: str
    reason: str

    def message(self) -> str:
        return f"{self.what} is not available in this build: `{self.module}` cannot be used ({self.reason})."


def load(module: str, names: tuple[str, ...], what: str) -> ModuleType | Missing:
    """The module when it imports and has all `names`, else a Missing saying why."""
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        return Missing(what, module, f"{type(err).__name__}: {err}")
    absent = [n for n in names if not hasattr(mod, n)]
    if absent:
        return Missing(what, module, "it has no " + ", ".join(absent))
    return mod


def prepare() -> ModuleType | Missing:
    return load("lib_lora.dataset.prepare", ("prepare_dataset", "reprocess_image"), "Prepare (crop and cut out)")


def prepare_config() -> Any:
    return _config_class("PrepareConfig", "Prepare settings")


def tag_config() -> Any:
    return _config_class("TagConfig", "Tagger settings")


def taggers() -> ModuleType | Missing:
    return load("lib_lora.tagging.taggers", ("tagger_for",), "Auto-tagging")


def captions() -> ModuleType | Missing:
    return load("lib_lora.tagging.captions", ("tag_dataset",), "Auto-tagging")


def rules() -> ModuleType | Missing:
    return load("lib_lora.tagging.rules", ("PRESETS", "preview_preset", "apply_preset"), "Tag rule presets")


def session() -> ModuleType | Missing:
    return load("lib_lora.tagging.session", ("EditSession",), "Tag editing")


def training_data() -> ModuleType | Missing:
    return load("lib_lora.training.data", ("plan_steps", "read_image"), "Step planning")


def training_run() -> ModuleType | Missing:
    return load("lib_lora.training.run", ("train",), "Training")


def _config_class(name: str, what: str) -> Any:
    mod = load("lib_lora.config", (name,), what)
    return mod if isinstance(mod, Missing) else getattr(mod, name)
