"""The config a run trains with: the request (a form, a REST body, CLI flags) plus what the
host decides. Every front end starts a training through `prepare_train_config`, so the same
request gives the same TrainConfig from the Train tab, the WebUI's REST route and the CLI.

`training_precision` is the one rule for the mixed precision a run uses; the trainer applies
it too, once it knows the device and the weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import torch

from lib_lora.config import TrainConfig, validate
from lib_lora.errors import UserError
from lib_lora.names import validate_name

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


def prepare_train_config(host: RunPlaces | None, cfg: TrainConfig, backbone: Any | None = None) -> TrainConfig:
    """`cfg` as the run trains it, validated:

    - the LoRA name checked (it names files and folders);
    - with a host: the LoRA goes to the host's LoRA folder and the run folder defaults to
      <work folder>/runs/<name>; without one (the CLI) both stay as given;
    - with the backbone the host gave: the device it is on; a host that trains its own
      model records that model's name as the base model; and 'auto' precision on half
      weights becomes their precision (`training_precision`), so the run folder's config
      says what ran and a resume on weights of another precision is refused."""
    name = validate_name(cfg.name, "LoRA name")
    changes: dict[str, Any] = {"name": name}
    if host is not None:
        changes["output_dir"] = str(host.lora_dir())
        changes["run_dir"] = cfg.run_dir or str(host.work_dir() / "runs" / name)
    if backbone is not None:
        device = torch.device(backbone.device)
        changes["device"] = str(device)
        if trains_own_model(host):
            changes["base_model"] = backbone.model_name or getattr(host, "name", "") or cfg.base_model
        weights = getattr(backbone, "dtype", None)
        if cfg.mixed_precision == "auto" and weights in HALF_PRECISIONS:
            changes["mixed_precision"] = training_precision("auto", device, weights)
    return validate(dataclasses.replace(cfg, **changes))
