"""LyCORIS network types (LoCon, LoHa, LoKr, DoRA) through the `lycoris-lora` package.

The algorithms are LyCORIS's own module classes; this module only puts one of them on each
target that `lora_targets()` gives (the same modules, under the same kohya names, as our plain
LoRA), so the network works in place on the WebUI's ldm model and on the standalone backbone,
and its file carries the kohya key names the WebUI's Lora extension, ComfyUI and Forge load
(`<name>.lora_up.weight`, `<name>.hada_w1_a`, `<name>.lokr_w1`, `<name>.dora_scale`, ...).

`make_network(targets, cfg)` is what the trainer calls: our own `LoRANetwork` for plain LoRA
(unchanged), a `LycorisKohyaNetwork` for the others.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lib_lora.training.family import SD15
from lib_lora.training.naming import Target

NETWORK_TYPES = ("lora", "locon", "loha", "lokr", "dora")
LYCORIS_TYPES = NETWORK_TYPES[1:]
# The LyCORIS algorithm behind each type (DoRA is LyCORIS's LoRA with weight decomposition).
ALGO = {"locon": "locon", "loha": "loha", "lokr": "lokr", "dora": "locon"}
LYCORIS_REQUIREMENT = "lycoris-lora==3.4.0"
BYPASS_TYPES = ("locon", "loha")  # see lycoris_kwargs


def missing_lycoris_message(network_type: str) -> str:
    return (f"The {network_type} network type needs the LyCORIS package, which is not installed; "
            f"install it with `pip install {LYCORIS_REQUIREMENT}` (the WebUI installs it at its next start).")


def _module_class(network_type: str) -> type:
    try:
        from lycoris.modules.locon import LoConModule
        from lycoris.modules.loha import LohaModule
        from lycoris.modules.lokr import LokrModule
    except ImportError:
        from lib_lora.errors import UserError

        raise UserError(missing_lycoris_message(network_type)) from None
    return {"locon": LoConModule, "loha": LohaModule, "lokr": LokrModule}[ALGO[network_type]]


def lycoris_kwargs(network_type: str, factor: int = -1) -> dict[str, Any]:
    """Extra arguments of the LyCORIS module class for a type (beyond dim, alpha, dropout)."""
    # Bypass mode adds the module's output to the layer's (W x + dW x): LoCon then costs what
    # LoRA does, where LyCORIS's rebuild mode forms W + dW and keeps it for every layer (3.2x
    # the step's CPU time and +3 GB at the seed recipe, docs/BENCHMARKS.md). DoRA needs the
    # rebuilt weight (its norm; LyCORIS's bypass forward skips the decomposition), and LoKr's
    # bypass forward in 3.4.0 is wrong (Linear: another output; 3x3 conv: a shape error).
    kw: dict[str, Any] = {"bypass_mode": network_type in BYPASS_TYPES}
    if network_type == "lokr":
        kw["factor"] = int(factor)
    if network_type == "dora":
        # The WebUI v1.10 (network.py apply_weight_decompose) normalises the merged weight over its
        # input dimension: LyCORIS's wd_on_out=False. Its default (True) would load, but wrongly.
        kw["weight_decompose"] = True
        kw["wd_on_out"] = False
    return kw


def network_args(network_type: str, conv_dim: int, conv_alpha: float, dropout: float, factor: int) -> dict[str, str]:
    """`ss_network_args` as kohya's sd-scripts writes them for `--network_module lycoris.kohya`
    (the `--network_args key=value` strings it was given)."""
    args = {"algo": ALGO[network_type]}
    if conv_dim:
        args["conv_dim"] = str(conv_dim)
        args["conv_alpha"] = str(conv_alpha)
    if dropout:
        args["dropout"] = str(dropout)
    if network_type == "lokr":
        args["factor"] = str(factor)
    if network_type == "dora":
        args["dora_wd"] = "True"
        args["wd_on_output"] = "False"
    return args


def _base_network_class() -> type:
    try:
        from lycoris.wrapper import LycorisNetwork
    except ImportError:
        return nn.Module
    return LycorisNetwork


class LycorisKohyaNetwork(_base_network_class()):  # type: ignore[misc]
    """LyCORIS modules on our targets, each registered under its kohya name.

    Offers what the trainer uses of `LoRANetwork`: apply/remove, set_multiplier, names,
    parameters_for, state_dict_kohya and load_kohya."""

    def __init__(
        self,
        targets: Iterable[Target],
        network_type: str,
        dim: int,
        alpha: float,
        conv_dim: int = 0,
        conv_alpha: float = 1.0,
        dropout: float = 0.0,
        factor: int = -1,
        multiplier: float = 1.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
    ):
        module_class = _module_class(network_type)
        # LycorisNetwork's own constructor walks a model by class names; init_only gives an
        # empty network whose modules we make for exactly our targets.
        super().__init__(None, init_only=True)
        self.network_type = network_type
        self.multiplier = multiplier
        kw = lycoris_kwargs(network_type, factor)
        loras = []
        for t in targets:
            if t.conv3x3 and not conv_dim:
                continue
            d, a = (conv_dim, conv_alpha) if t.conv3x3 else (dim, alpha)
            # LyCORIS's own rank and module dropout (training only); rank_dropout_scale off, as
            # lycoris.kohya leaves it for sd-scripts users (it reads no such network arg).
            lora = module_class(t.name, t.module, multiplier, d, a, dropout, rank_dropout, module_dropout, False, **kw)
            loras.append(lora)
            self.add_module(t.name, lora)
        if not loras:
            raise ValueError("no LoRA targets found in the model")
        self.loras = loras
        self._had_forward: dict[str, bool] = {}
        self.applied = False

    def apply(self) -> LycorisKohyaNetwork:
        if not self.applied:
            for lora in self.loras:
                self._had_forward[lora.lora_name] = "forward" in vars(lora.org_module[0])
                lora.apply_to()
            self.applied = True
        return self

    def remove(self) -> None:
        if not self.applied:
            return
        for lora in reversed(self.loras):
            lora.restore()
            org = lora.org_module[0]
            top = vars(org).get("forward")
            # LyCORIS puts back the bound class forward as an instance attribute; dropping it
            # leaves the module exactly as it was (no attribute, no reference cycle).
            if (not self._had_forward.get(lora.lora_name) and getattr(top, "__self__", None) is org
                    and getattr(top, "__func__", None) is type(org).forward):
                del org.forward
        self.applied = False

    def names(self, prefix: str | None = None) -> list[str]:
        return [m.lora_name for m in self.loras if prefix is None or m.lora_name.startswith(prefix + "_")]

    def parameters_for(self, prefix: str) -> list[nn.Parameter]:
        """Trainable parameters of the modules under `prefix` ('lora_unet', 'lora_te', 'lora_te1'...)."""
        return [p for m in self.loras if m.lora_name.startswith(prefix + "_") for p in m.parameters()]

    def unet_parameters(self, unet_prefix: str = SD15.unet_prefix) -> list[nn.Parameter]:
        return self.parameters_for(unet_prefix)

    def te_parameters(self, unet_prefix: str = SD15.unet_prefix) -> list[nn.Parameter]:
        """Every text encoder's parameters (lora_te, or lora_te1 and lora_te2): all but the U-Net's."""
        return [p for m in self.loras if not m.lora_name.startswith(unet_prefix + "_") for p in m.parameters()]

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        # The tensors themselves (LyCORIS's modules state-dict products such as up x scalar):
        # the run state and the LR probe copy values back into what this returns.
        out = {} if destination is None else destination
        for lora in self.loras:
            nn.Module.state_dict(lora, destination=out, prefix=f"{prefix}{lora.lora_name}.", keep_vars=keep_vars)
        return out

    def state_dict_kohya(self) -> dict[str, torch.Tensor]:
        """Each module's tensors as LyCORIS saves them, under `<kohya name>.<key>`, but the alpha
        of a LoKr module whose two factors are whole matrices (`loader_neutral_alpha`)."""
        out: dict[str, torch.Tensor] = {}
        for lora in self.loras:
            for key, value in lora.custom_state_dict().items():
                out[f"{lora.lora_name}.{key}"] = value.detach()
            neutral = loader_neutral_alpha(lora)
            if neutral is not None:
                out[f"{lora.lora_name}.alpha"] = neutral
        return out

    @torch.no_grad()
    def load_kohya(self, tensors: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load weights written by `state_dict_kohya` (a saved file or a checkpoint). A LoKr
        module of whole factors keeps its own alpha: its scale is 1 whatever the file says."""
        own = self.state_dict()
        missing = [k for k in own if k not in tensors]
        if missing and strict:
            raise KeyError(f"missing {missing[0]}")
        whole = {f"{lora.lora_name}.alpha" for lora in self.loras if loader_neutral_alpha(lora) is not None}
        for key, value in own.items():
            if key in tensors and key not in whole:
                value.copy_(tensors[key].to(value.dtype))


def loader_neutral_alpha(module: nn.Module) -> torch.Tensor | None:
    """For a LoKr module whose w1 and w2 are both whole matrices: the alpha that makes every
    loader apply it at scale 1, as LyCORIS trains it; None for any other module.

    LyCORIS trains such a module at scale 1 and stores alpha = dim. The WebUI, Forge and older
    ComfyUI ignore alpha there (scale 1); ComfyUI from commit 839df9f divides it by
    w2.shape[0] // w1.shape[0], so a stored alpha = dim scaled the layer by dim / that.
    Alpha = w2.shape[0] // w1.shape[0] gives 1 in both readings, and LyCORIS itself ignores it."""
    if not (getattr(module, "use_w1", False) and getattr(module, "use_w2", False)):
        return None
    ratio = module.lokr_w2.shape[0] // module.lokr_w1.shape[0]
    return torch.tensor(float(ratio), dtype=module.alpha.dtype)


def network_from_file(targets: Iterable[Target], tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str]) -> LycorisKohyaNetwork:
    """The network of a `lycoris.kohya` file (ours or kohya's), its weights loaded.

    The layout of each module (LoKr's factors, full or decomposed parts) follows from the
    type and arguments the metadata records, as it did when the file was trained."""
    from lib_lora.errors import UserError

    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
        algo = str(args.get("algo", "lora")).lower()
        dora = str(args.get("dora_wd", "False")).lower() == "true"
        kind = "dora" if dora and algo in ("lora", "locon") else {"lora": "locon"}.get(algo, algo)
        dim, alpha = int(metadata["ss_network_dim"]), float(metadata["ss_network_alpha"])
        conv_dim, conv_alpha = int(args.get("conv_dim", 0)), float(args.get("conv_alpha", 1.0))
        factor = int(args.get("factor", -1))
    except (KeyError, ValueError, TypeError, json.JSONDecodeError):
        raise UserError("This LyCORIS file does not say its network dim, alpha and arguments in its metadata; "
                        "it cannot be rebuilt here.") from None
    if kind not in LYCORIS_TYPES or (dora and str(args.get("wd_on_output", "True")).lower() != "false"):
        raise UserError(f"This LyCORIS file's type ({algo}{' with DoRA' if dora else ''}) is not one this tab can "
                        "apply; test it in the WebUI.")
    present = {k.partition(".")[0] for k in tensors}
    wanted = [t for t in targets if t.name in present]
    net = LycorisKohyaNetwork(wanted, kind, dim=dim, alpha=alpha, conv_dim=conv_dim, conv_alpha=conv_alpha,
                              factor=factor)
    try:
        net.load_kohya(tensors, strict=True)
    except (KeyError, RuntimeError):
        raise UserError("This LyCORIS file's weights do not fit the model's layers; is it for this base model?") from None
    return net


def make_network(targets: Iterable[Target], cfg: Any) -> nn.Module:
    """The network the config asks for, on `targets` (not applied)."""
    kind = getattr(cfg, "network_type", "lora")
    if kind == "lora":
        from lib_lora.training.lora import LoRANetwork

        return LoRANetwork(
            targets, dim=cfg.dim, alpha=cfg.alpha, conv_dim=cfg.conv_dim, conv_alpha=cfg.conv_alpha,
            dropout=cfg.network_dropout, multiplier=1.0,
            rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout,
        )  # fmt: skip
    return LycorisKohyaNetwork(
        targets, kind, dim=cfg.dim, alpha=cfg.alpha, conv_dim=cfg.conv_dim, conv_alpha=cfg.conv_alpha,
        dropout=cfg.network_dropout, factor=cfg.lokr_factor,
        rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout,
    )  # fmt: skip
