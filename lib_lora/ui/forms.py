"""UI controls generated from the config schema (lib_lora.config `opt(...)` metadata).

A field is declared once in the config; here it becomes a Checkbox (bool), a Dropdown (it
has choices), a Number (int/float, with its bounds) or a Textbox, labelled by its help text.
`collect` turns the controls' values back into a validated config through the schema's own
`coerce`, so the page shows the same message as the CLI for a bad value (in its labels).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

import gradio as gr

from lib_lora.config import coerce_fields, field_type, is_record_list, phrase_options, validate
from lib_lora.ui.paths import FolderPolicy

# Field names that read badly when simply capitalised.
LABELS = {
    "out": "Work folder", "remove_bg": "Background removal", "bg_color": "Background colour",
    "keep_rgba": "Keep transparency", "model_dir": "Model folder", "face_model": "Face model",
    "dim": "Network dim", "alpha": "Network alpha", "conv_dim": "Conv dim", "conv_alpha": "Conv alpha",
    "lr_scheduler": "LR schedule", "lr_warmup_steps": "LR warm-up steps", "te_lr_ratio": "Text-encoder LR ratio",
    "text_encoder_lr": "Text-encoder LR", "min_snr_gamma": "Min-SNR gamma", "run_dir": "Run folder",
    "train_unet": "Train U-Net", "clip_skip": "CLIP skip", "max_grad_norm": "Max grad norm",
    "bucket_reso_steps": "Bucket resolution steps", "min_bucket_reso": "Min bucket resolution",
    "max_bucket_reso": "Max bucket resolution", "log_every_n_steps": "Log every N steps",
    "save_every_n_steps": "Save every N steps", "save_every_n_epochs": "Save every N epochs",
    "tags_file": "Tags file", "general_threshold": "General threshold", "score_floor": "Score floor",
    "max_tags": "Max tags", "existing": "Existing captions", "batch_size": "Batch size",
    "upscale": "Upscale small images", "recursive": "Include sub-folders", "oom_retry": "Retry on out-of-memory",
    "lr": "Learning rate", "network_type": "Network type", "lokr_factor": "LoKr factor",
    "v_parameterization": "V-prediction model", "zero_terminal_snr": "Zero terminal SNR", "huber_c": "Huber c",
    "multires_noise_iterations": "Multires noise octaves", "multires_noise_discount": "Multires noise discount",
}


def ui_text(text: str) -> str:
    """A core message as the page says it: an option the core names by its CLI flag
    (`--upscale`) becomes the control's label in quotes (“Upscale small images”)."""
    return phrase_options(str(text), lambda f: f"“{label_for(f)}”")


def label_for(f: dataclasses.Field) -> str:
    """'network_dropout' -> 'Network dropout'; the help text becomes the info line."""
    return LABELS.get(f.name) or f.name.replace("_", " ").capitalize()


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def fields(cls: type, group: str | None = None, skip: typing.Iterable[str] = ()) -> list[dataclasses.Field]:
    skip = set(skip)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if group is not None and f.metadata.get("group", "advanced") != group:
            continue
        out.append(f)
    return out


def component_for(cls: type, f: dataclasses.Field, value: Any = None, elem_prefix: str = "") -> gr.components.Component:
    typ, optional = field_type(cls, f)
    meta = f.metadata
    value = default_of(f) if value is None else value
    kw: dict[str, Any] = {"label": label_for(f), "info": meta.get("help") or None}
    if elem_prefix:
        kw["elem_id"] = f"{elem_prefix}{f.name}"
    if typ is bool:
        return gr.Checkbox(value=bool(value), **kw)
    if meta.get("choices"):
        choices = [str(c) for c in meta["choices"]]
        return gr.Dropdown(choices=choices, value=None if value is None else str(value), **kw)
    if typ in (int, float) and not optional:
        return gr.Number(
            value=value,
            precision=0 if typ is int else None,
            minimum=meta.get("min"),
            maximum=meta.get("max"),
            **kw,
        )
    if is_record_list(typ):  # subsets: JSON objects
        return gr.Textbox(value=json.dumps(value, ensure_ascii=False) if value else "", lines=3, **kw)
    if typing.get_origin(typ) is list:
        return gr.Textbox(value=", ".join(map(str, value or [])), **kw)
    # Optional numbers are text so that "empty" can mean "off / default".
    return gr.Textbox(value="" if value is None else str(value), **kw)


def build(cls: type, names: list[str], values: dict[str, Any] | None = None, elem_prefix: str = "") -> dict[str, Any]:
    values = values or {}
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    return {n: component_for(cls, by_name[n], values.get(n), elem_prefix) for n in names}


def collect(cls: type, names: list[str], raw_values: list[Any], base: Any | None = None, *,
            policy: FolderPolicy, **fixed: Any) -> Any:
    """A validated config from the controls' values (in `names` order) plus fixed values.

    Every path field goes through the page's path `policy` first, before the config's own
    checks look at any file, so a refused path says only that it is outside the allowed folders."""
    values = coerce_fields(cls, dict(zip(names, raw_values, strict=True)))
    values.update(fixed)
    cfg = dataclasses.replace(base, **values) if base is not None else cls(**values)
    return validate(policy.check_config(cfg, label_for))


def values_of(cfg: Any, names: list[str]) -> list[Any]:
    """Control values for a config (the inverse of collect), e.g. after a preset."""
    out = []
    for n in names:
        v = getattr(cfg, n)
        if isinstance(v, list) and any(isinstance(i, dict) for i in v):
            v = json.dumps(v, ensure_ascii=False)
        elif isinstance(v, list):
            v = ", ".join(map(str, v))
        elif v is None:
            v = ""
        elif isinstance(v, str | bool | int | float):
            pass
        else:
            v = str(v)
        out.append(v)
    return out
