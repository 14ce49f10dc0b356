"""LoRA modules in kohya's format: y = W x + up(down(x)) * multiplier * alpha / dim.

The network wraps each target module's `forward` (the module itself stays where it is, so
the host's model tree, state dict and weights are untouched) and `remove()` puts the
original forwards back. LoRA weights are fp32 whatever the base model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lib_lora.training.family import SD15
from lib_lora.training.naming import Target, is_linear


class LoRAModule(nn.Module):
    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float, dropout: float = 0.0, multiplier: float = 1.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        self.lora_name = name
        if isinstance(org, nn.Conv2d):
            self.lora_down = nn.Conv2d(org.in_channels, dim, org.kernel_size, org.stride, org.padding, bias=False)
            self.lora_up = nn.Conv2d(dim, org.out_channels, 1, 1, bias=False)
        elif is_linear(org):  # nn.Linear, or Forge's own Linear (same attributes)
            self.lora_down = nn.Linear(org.in_features, dim, bias=False)
            self.lora_up = nn.Linear(dim, org.out_features, bias=False)
        else:
            raise TypeError(f"LoRA supports Linear and Conv2d, not {type(org).__name__} ({name})")
        self.dim = dim
        alpha = float(dim if alpha in (None, 0) else alpha)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / dim
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.multiplier = multiplier
        # kohya's init: down Kaiming-uniform (a=sqrt(5)), up zero, so training starts at W.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self._org = [org]  # a list, so the wrapped module is not registered as our child
        self._org_forward = None
        self._wrapped_attr = False

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    def apply_to(self) -> None:
        if self._org_forward is None:
            org = self.org_module
            # Another LoRA may already wrap this module (two LoRAs in one prompt): then what we
            # wrap is its instance attribute, and that is what remove() must put back.
            self._wrapped_attr = "forward" in vars(org)
            self._org_forward = org.forward
            org.forward = self.forward

    def remove(self) -> None:
        if self._org_forward is None:
            return
        org = self.org_module
        top = vars(org).get("forward")
        if top == self.forward:
            if self._wrapped_attr:
                org.forward = self._org_forward
            else:  # we wrapped the class's forward: dropping our attribute restores exactly that
                del org.forward
        else:
            # A LoRA applied after this one wraps our forward: take us out of its chain.
            above = getattr(top, "__self__", None)
            while isinstance(above, LoRAModule) and above._org_forward != self.forward:
                above = getattr(above._org_forward, "__self__", None)
            if isinstance(above, LoRAModule):
                above._org_forward, above._wrapped_attr = self._org_forward, self._wrapped_attr
        self._org_forward = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self._org_forward(x, *args, **kwargs)
        if self.multiplier == 0:
            return out
        # kohya's module dropout: the whole module sits this step out. The draw comes from torch's
        # global RNG (seeded by the run, saved in its state), so a resumed run draws the same.
        if self.module_dropout and self.training and torch.rand(1) < self.module_dropout:
            return out
        h = self.lora_down(x.to(self.lora_down.weight.dtype) if not torch.is_autocast_enabled() else x)
        if self.dropout and self.training:
            h = nn.functional.dropout(h, p=self.dropout)
        scale = self.scale
        if self.rank_dropout and self.training:
            # kohya's rank dropout: each sample keeps each rank with probability 1 - p (one mask
            # over all tokens or pixels), and the kept ranks count 1 / (1 - p) as much.
            mask = torch.rand((h.size(0), self.dim), device=h.device) > self.rank_dropout
            if h.dim() == 3:  # (batch, tokens, rank)
                mask = mask.unsqueeze(1)
            elif h.dim() == 4:  # (batch, rank, h, w)
                mask = mask.unsqueeze(-1).unsqueeze(-1)
            h = h * mask.to(h.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        # Scale the rank-wide hidden units, not the full-width output: same result, a smaller pass.
        delta = self.lora_up(h * (self.multiplier * scale))
        return out + delta.to(out.dtype)


class LoRANetwork(nn.Module):
    """All LoRA modules of one network, keyed by kohya name."""

    def __init__(
        self,
        targets: Iterable[Target],
        dim: int,
        alpha: float,
        conv_dim: int = 0,
        conv_alpha: float = 1.0,
        dropout: float = 0.0,
        multiplier: float = 1.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
    ):
        super().__init__()
        mods = {}
        drops = {"rank_dropout": rank_dropout, "module_dropout": module_dropout}
        for t in targets:
            if t.conv3x3:
                if not conv_dim:
                    continue
                mods[t.name] = LoRAModule(t.name, t.module, conv_dim, conv_alpha, dropout, multiplier, **drops)
            else:
                mods[t.name] = LoRAModule(t.name, t.module, dim, alpha, dropout, multiplier, **drops)
        if not mods:
            raise ValueError("no LoRA targets found in the model")
        self.loras = nn.ModuleDict(mods)
        self.applied = False

    def apply(self) -> LoRANetwork:
        for m in self.loras.values():
            m.apply_to()
        self.applied = True
        return self

    def remove(self) -> None:
        for m in self.loras.values():
            m.remove()
        self.applied = False

    def set_multiplier(self, multiplier: float) -> None:
        for m in self.loras.values():
            m.multiplier = multiplier

    def names(self, prefix: str | None = None) -> list[str]:
        return [n for n in self.loras if prefix is None or n.startswith(prefix + "_")]

    def parameters_for(self, prefix: str) -> list[nn.Parameter]:
        """Trainable parameters of the modules under `prefix` ('lora_unet', 'lora_te', 'lora_te1'...)."""
        return [p for n in self.names(prefix) for p in self.loras[n].parameters()]

    def unet_parameters(self, unet_prefix: str = SD15.unet_prefix) -> list[nn.Parameter]:
        return self.parameters_for(unet_prefix)

    def te_parameters(self, unet_prefix: str = SD15.unet_prefix) -> list[nn.Parameter]:
        """Every text encoder's LoRA parameters (lora_te, or lora_te1 and lora_te2): all but the U-Net's."""
        return [p for n, m in self.loras.items() if not n.startswith(unet_prefix + "_") for p in m.parameters()]

    def state_dict_kohya(self) -> dict[str, torch.Tensor]:
        """`<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` (0-d), as in kohya files."""
        out: dict[str, torch.Tensor] = {}
        for name, m in self.loras.items():
            out[f"{name}.lora_down.weight"] = m.lora_down.weight.detach()
            out[f"{name}.lora_up.weight"] = m.lora_up.weight.detach()
            out[f"{name}.alpha"] = m.alpha.detach()
        return out

    @torch.no_grad()
    def load_kohya(self, tensors: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load kohya-format weights (e.g. from a saved LoRA or a checkpoint) into this network."""
        for name, m in self.loras.items():
            for part in ("lora_down", "lora_up"):
                key = f"{name}.{part}.weight"
                if key in tensors:
                    getattr(m, part).weight.copy_(tensors[key].to(getattr(m, part).weight.dtype))
                elif strict:
                    raise KeyError(f"missing {key}")
            if f"{name}.alpha" in tensors:
                m.alpha.copy_(tensors[f"{name}.alpha"].float())
                m.scale = float(m.alpha) / m.dim
