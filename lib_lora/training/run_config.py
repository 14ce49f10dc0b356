"""The config a run trains with: the request (a form, a REST body, CLI flags) plus what the
host decides. Every front end starts a training through `prepare_train_config`, so the same
request gives the same TrainConfig from the Train tab, the WebUI's REST route and the CLI.

`training_precision` is the one rule for the mixed precision a run uses; the trainer applies
it too, once it knows the device and the weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from lib_lora.config import TrainConfig, for_family, validate
from lib_lora.errors import UserError
from lib_lora.names import validate_name
from lib_lora.training.family import ModelFamily, family_by_name, family_of

HALF_PRECISIONS = {torch.float16: "fp16", torch.bfloat16: "bf16"}


class RunPlaces(Protocol):
    """What a host (`lib_lora.hosts.base.Host`) tells a run: where LoRAs and run folders go."""

    def lora_dir(self) -> Path: ...

    def work_dir(self) -> Path: ...


def trains_own_model(host: Any) -> bool:
    """Whether the host trains the model it has loaded (the WebUI's checkpoint): it offers no
    base-model choice (a standalone host has a `base_model` to choose)."""
    return host is not None and not hasattr(host, "base_model")


def training_precision(requested: str, device: torch.device, weights: torch.dtype | None = None) -> str:
    """'fp16' | 'bf16' | 'no' (fp32): the autocast a run trains under.

    Half-precision weights (a host's model) train only under autocast of their own type, so
    they decide 'auto' and 'no'; otherwise 'auto' is fp16 on CUDA and fp32 elsewhere. fp16
    autocast for fp32 weights needs a CUDA GPU."""
    half = HALF_PRECISIONS.get(weights) if weights is not None else None
    if half is not None and requested in ("auto", "no"):
        return half
    if requested == "auto":
        return "fp16" if device.type == "cuda" else "no"
    if requested == "fp16" and device.type != "cuda" and half != "fp16":
        raise UserError("fp16 mixed precision needs a CUDA GPU; set --mixed-precision to no (or bf16) on the CPU.")
    return requested


def config_family(cfg: TrainConfig, backbone: Any | None = None) -> ModelFamily:
    """The family of the model a config trains: the backbone's, else read from the base-model
    setting (a file's header or a folder's configs; no weights are loaded)."""
    if backbone is not None:
        return family_of(backbone)
    from lib_lora.training.models_sdxl import model_family

    return family_by_name(model_family(cfg.base_model))


def family_note(cfg: TrainConfig, family: ModelFamily) -> str:
    """One line of the plan: the family and the defaults it set."""
    lo, hi = cfg.min_bucket_reso, cfg.max_bucket_reso
    trains = "U-Net and text encoders" if cfg.train_text_encoder and cfg.train_unet else \
        "U-Net only" if cfg.train_unet else "text encoders only"
    note = f"Model family: {family.label}; resolution {cfg.resolution}, buckets {lo}-{hi} px, training the {trains}."
    if cfg.clip_skip > 1 and not family.clip_skip_applies:
        note += f" CLIP skip {cfg.clip_skip} is ignored: {family.label}'s text encoders give their penultimate layer."
    return note


def prepare_train_config(host: RunPlaces | None, cfg: TrainConfig, backbone: Any | None = None, *,
                         given: Iterable[str] | None = None, preset: str | None = None) -> TrainConfig:
    """`cfg` as the run trains it, validated:

    - the LoRA name checked (it names files and folders);
    - the model family's defaults and its recipe `preset` (`config.for_family`: SDXL's 1024
      resolution, its buckets and U-Net only) in every field the user did not give: `given`
      names the fields the user gave (the CLI's flags, a REST body's keys, the Train tab's
      changed controls); None, for a config built in code: the fields that differ from
      TrainConfig's defaults;
    - with a host: the LoRA goes to the host's LoRA folder and the run folder defaults to
      <work folder>/runs/<name>; without one (the CLI) both stay as given;
    - with the backbone the host gave: the device it is on; a host that trains its own
      model records that model's name as the base model; and 'auto' precision on half
      weights becomes their precision (`training_precision`), so the run folder's config
      says what ran and a resume on weights of another precision is refused."""
    name = validate_name(cfg.name, "LoRA name")
    cfg = for_family(cfg, config_family(cfg, backbone), given, preset)
    changes: dict[str, Any] = {"name": name}
    if host is not None:
        changes["output_dir"] = str(host.lora_dir())
        changes["run_dir"] = cfg.run_dir or str(host.work_dir() / "runs" / name)
    if backbone is not None:
        allowed = getattr(backbone, "network_types", None)  # a backbone whose layers not every type wraps
        if allowed is not None and cfg.network_type not in allowed:
            raise UserError(backbone.network_refusal.format(type=cfg.network_type))
        device = torch.device(backbone.device)
        changes["device"] = str(device)
        if trains_own_model(host):
            changes["base_model"] = backbone.model_name or getattr(host, "name", "") or cfg.base_model
        weights = getattr(backbone, "dtype", None)
        if cfg.mixed_precision == "auto" and weights in HALF_PRECISIONS:
            changes["mixed_precision"] = training_precision("auto", device, weights)
    return validate(dataclasses.replace(cfg, **changes))
