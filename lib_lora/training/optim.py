"""Optimizers and learning-rate schedules for the LoRA parameters.

AdamW8bit (bitsandbytes) is the tutorial's choice; it is used when it can actually step on the
training device (probed once per device kind: bitsandbytes 0.45-0.49 cannot on the CPU), and
torch's AdamW otherwise, with one line saying so. D-Adaptation Adam and Prodigy find their own
step size: their `d x lr` is the learning rate they settled on (what the LR probe reads).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lib_lora.config import TrainConfig

log = logging.getLogger(__name__)

_BNB_CAN_STEP: dict[str, tuple[bool, str]] = {}


def _bitsandbytes() -> Any:
    """`import bitsandbytes`, without the warning its CPU backend logs on CPUs with AVX512-BF16
    when the optional `kernels` package is missing: that is for its 4-bit matmul, which a
    LoRA trainer never uses, and users took it for an error."""
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes

        return bitsandbytes
    finally:
        quiet.setLevel(level)


def bnb_adamw8bit_works(device: torch.device | str) -> tuple[bool, str]:
    """Whether bitsandbytes' AdamW8bit can step on this kind of device, and why not."""
    kind = torch.device(device).type
    if kind in _BNB_CAN_STEP:
        return _BNB_CAN_STEP[kind]
    try:
        bnb = _bitsandbytes()
        # 8-bit state is only used for tensors of >= 4096 elements; smaller ones step in 32 bit,
        # so the probe must be at least that large to test the 8-bit kernels.
        p = torch.nn.Parameter(torch.zeros(8192, device=device))
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        ok = bool(torch.isfinite(p).all()) and bool((p != 0).any())
        result = (ok, "" if ok else "it produced invalid values")
    except Exception as err:  # noqa: BLE001 - any failure means: not usable here
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        result = (False, first[:160].rstrip(" :"))
    _BNB_CAN_STEP[kind] = result
    return result


@dataclass
class OptimizerChoice:
    optimizer: torch.optim.Optimizer
    name: str  # what the config asked for
    used: str  # the class actually stepping, e.g. torch.optim.adamw.AdamW
    args: str  # its arguments that differ from its own defaults, for the metadata (given_args)
    note: str  # a line for the user when the choice differs from the request ('' otherwise)


def param_groups(
    unet_params: list[torch.nn.Parameter], te_params: list[torch.nn.Parameter], unet_lr: float, te_lr: float
) -> list[dict[str, Any]]:
    groups = []
    if unet_params:
        groups.append({"params": unet_params, "lr": unet_lr, "name": "unet"})
    if te_params:
        groups.append({"params": te_params, "lr": te_lr, "name": "textencoder"})
    return groups


def text_encoder_lr(cfg: TrainConfig, unet_lr: float) -> float:
    """te lr = cfg.text_encoder_lr when set, else unet lr x te_lr_ratio."""
    return cfg.text_encoder_lr if cfg.text_encoder_lr is not None else unet_lr * cfg.te_lr_ratio


def lr_plan(cfg: TrainConfig, with_unet: bool = True) -> str:
    """The learning rates of a run, one line for its plan. The text encoder's default is the
    U-Net's x te_lr_ratio (0.1: the tutorial's recipe) where kohya's is the U-Net's own, so the
    plan says which it is. `with_unet` false: the U-Net's lr is shown beside the plan (the
    Train tab's control), so only the text encoder's is said, relative to it."""
    auto = cfg.lr == "auto"
    unet = "from the LR probe" if auto else f"{float(cfg.lr):g}"
    if not cfg.train_text_encoder:
        return f"Learning rate: U-Net {unet}; the text encoder is not trained." if with_unet else \
            "The text encoder is not trained."
    if cfg.text_encoder_lr is not None:
        te = f"{cfg.text_encoder_lr:g} (--text-encoder-lr)"
    elif not cfg.train_unet:
        te = "--lr (only the text encoder trains)" if not with_unet else \
            "from the LR probe" if auto else f"{float(cfg.lr):g} (--lr: only the text encoder trains)"
    else:
        value = "" if auto or not with_unet else f"{text_encoder_lr(cfg, float(cfg.lr)):g} = "
        te = f"{value}{cfg.te_lr_ratio:g} x the U-Net's (--te-lr-ratio; kohya's default is the U-Net's own)"
    if not with_unet:
        return f"Text-encoder learning rate: {te}."
    if not cfg.train_unet:
        return f"Learning rate: text encoder {te}; the U-Net is not trained."
    return f"Learning rates: U-Net {unet}, text encoder {te}."


def make_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]], device: torch.device) -> OptimizerChoice:
    name = cfg.optimizer
    wd = cfg.weight_decay
    note = ""
    if name == "adamw8bit":
        ok, why = bnb_adamw8bit_works(device)
        if ok:
            opt = _bitsandbytes().optim.AdamW8bit(groups, weight_decay=wd)
            return OptimizerChoice(opt, name, _qualname(opt), given_args(type(opt), weight_decay=wd), "")
        note = f"AdamW8bit cannot step on {torch.device(device).type} ({why}); using torch AdamW (32-bit) instead."
        log.debug(note)
        name_used = "adamw"
    else:
        name_used = name
    if name_used == "adamw":
        from lib_lora.training.speed import adamw_kwargs

        kernels = adamw_kwargs(device)  # fused/foreach kernels (issue 8)
        opt = torch.optim.AdamW(groups, weight_decay=wd, **kernels)
        args = given_args(type(opt), weight_decay=wd)
    elif name_used == "dadaptation":
        import dadaptation

        # decouple=True is AdamW-style weight decay, as kohya users run it.
        opt = dadaptation.DAdaptAdam(_one_lr(groups, "layer_scale"), weight_decay=wd, decouple=True)
        args = given_args(type(opt), weight_decay=wd, decouple=True)
    elif name_used == "prodigy":
        import prodigyopt

        shared = _one_lr(groups, None)
        if any(g["lr"] != s["lr"] for g, s in zip(groups, shared, strict=True)):
            note = "Prodigy uses one learning rate for all groups: the text-encoder lr ratio does not apply."
        opt = prodigyopt.Prodigy(shared, weight_decay=wd, decouple=True)
        args = given_args(type(opt), weight_decay=wd, decouple=True)
    else:  # config validation lists the choices; this guards a new one added there only
        raise ValueError(f"unknown optimizer {name!r}")
    return OptimizerChoice(opt, name, _qualname(opt), args, note)


def given_args(cls: type, **kwargs: Any) -> str:
    """The arguments of an optimizer that differ from its class's defaults, as kohya writes
    them after the class in ss_optimizer ("k=v" joined by ","): what a kohya user passes as
    optimizer_args for the same run, and nothing for a default (torch AdamW's weight decay
    0.01). The fused/foreach kernel choice changes no result and is left out, as kohya does."""
    params = inspect.signature(cls).parameters
    return ",".join(f"{k}={v}" for k, v in kwargs.items() if k not in params or params[k].default != v)


def _one_lr(groups: list[dict], scale_key: str | None) -> list[dict]:
    """D-Adaptation and Prodigy share one d over all groups and refuse different lrs per group:
    every group gets the first group's lr; DAdaptAdam keeps the ratio as its `layer_scale`."""
    base = float(groups[0]["lr"])
    out = []
    for g in groups:
        g = dict(g)
        if scale_key and base:
            g[scale_key] = float(g["lr"]) / base
        g["lr"] = base
        out.append(g)
    return out


def _qualname(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """cfg.lr_warmup_steps below 1 is a fraction of all steps; a constant schedule has none."""
    if cfg.lr_scheduler == "constant":
        return 0
    w = cfg.lr_warmup_steps
    return int(round(w * total_steps)) if w < 1 else int(w)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """diffusers' schedules (the ones kohya uses), by the config's name."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps)  # fmt: skip


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """{group: lr, group_d*lr: d x lr}: the step size each group really takes (x DAdaptAdam's
    `layer_scale`, which carries the text-encoder ratio: see `_one_lr`)."""
    out = {}
    for g in optimizer.param_groups:
        name = g.get("name", "group")
        scale = float(g.get("layer_scale", 1.0))
        out[name] = float(g["lr"]) * scale
        if "d" in g:
            out[f"{name}_d*lr"] = float(g["d"]) * float(g["lr"]) * scale
    return out

