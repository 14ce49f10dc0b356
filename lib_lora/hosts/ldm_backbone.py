"""The Backbone over the WebUI's loaded ldm model, trained in place (no second copy in memory).

`shared.sd_model` in A1111 is an ldm `LatentDiffusion`: the compvis U-Net at
`model.diffusion_model`, the VAE at `first_stage_model`, and the text encoder at
`cond_stage_model.wrapped.transformer` (a transformers CLIPTextModel; `.wrapped.tokenizer` is
its tokenizer). We tokenize and encode captions ourselves: `cond_stage_model([...])` would
parse prompt emphasis such as `(x:1.2)` in captions and apply the WebUI's clip-skip setting.

This module needs no WebUI (only torch and the naming module), so the tests drive it with a
tiny model built from the real ldm classes. `preserve_model_state` is the part of "host state
is sacred" that concerns the module tree itself; the WebUI host adds the parts that need
A1111 (applied LoRAs, attention hijacks, low-VRAM placement).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lib_lora.training import naming
from lib_lora.training.backbone import encode_text_chunks
from lib_lora.training.family import SD15, ModelFamily


def text_parts(cond_stage_model: nn.Module) -> tuple[nn.Module, Any]:
    """(CLIPTextModel, tokenizer) of an ldm cond stage, hijacked by A1111 (`.wrapped`) or not."""
    wrapped = getattr(cond_stage_model, "wrapped", cond_stage_model)
    transformer = getattr(wrapped, "transformer", None)
    tokenizer = getattr(wrapped, "tokenizer", None)
    if transformer is None or tokenizer is None:
        from lib_lora.errors import ModelLoadError

        raise ModelLoadError(
            "The loaded checkpoint's text encoder is not an SD1.5 CLIP text model; load an SD1.5 checkpoint."
        )
    return transformer, tokenizer


def weights_hash(tag: str, module: nn.Module) -> str:
    """sha256 of `tag` and every tensor of `module`'s state dict (names and bytes, sorted)."""
    import hashlib

    h = hashlib.sha256(tag.encode())
    with torch.no_grad():
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class LdmBackbone:
    """`lib_lora.training.backbone.Backbone` over an ldm LatentDiffusion, its weights used in place."""

    family: ModelFamily = SD15  # an ldm LatentDiffusion with one CLIP text encoder is SD1.x

    def __init__(self, sd_model: nn.Module, model_name: str = "", model_hash: str = "",
                 device: torch.device | None = None, model_legacy_hash: str = "") -> None:
        self.sd_model = sd_model
        self.unet: nn.Module = sd_model.model.diffusion_model
        self.text_encoder, self.tokenizer = text_parts(sd_model.cond_stage_model)
        first = next(self.unet.parameters())
        # Under --medvram the U-Net may sit on the CPU until used: the caller passes the device.
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = first.dtype
        self.model_name = model_name
        self.model_hash = model_hash
        self.model_legacy_hash = model_legacy_hash  # the WebUI's old 8-hex hash (kohya's ss_sd_model_hash)

    @functools.cached_property
    def vae_identity(self) -> str:
        """Which VAE makes our latents (the WebUI lets users swap it): a hash of its weights.
        Part of the latent cache's key, and of the seed each latent is sampled with."""
        return weights_hash(f"ldm-vae|{self.vae_dtype()}", self.sd_model.first_stage_model)

    # -- encoding ---------------------------------------------------------------------------
    def vae_dtype(self) -> torch.dtype:
        return next(self.sd_model.first_stage_model.parameters()).dtype

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> latents x the host's scale factor (the family's, 0.18215, for SD1.5),
        through the host's own VAE methods."""
        x = pixels.to(self.device, self.vae_dtype())
        posterior = self.sd_model.encode_first_stage(x)
        return self.sd_model.get_first_stage_encoding(posterior).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1], through the host's own VAE (and its --medvram hooks)."""
        return self.sd_model.decode_first_stage(latents.to(self.device, self.vae_dtype())).float()

    def encode_text(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """Token ids (B, n*77), one family chunk at a time -> (B, n*77, width)."""
        return encode_text_chunks(self.text_encoder, input_ids.to(self.device), clip_skip, family=self.family)

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps, context=cond)

    def lora_targets(self, conv: bool = False) -> list[naming.Target]:
        fam = self.family
        unet = naming.unet_targets(self.unet, conv, fam.unet_prefix)
        return standalone_order(unet, fam.unet_prefix) + naming.text_encoder_targets(
            self.text_encoder, fam.text_encoders[0].kohya_prefix)

    def enable_gradient_checkpointing(self) -> bool:
        """Recompute each U-Net block's activations during the backward pass instead of keeping
        them. torch's non-reentrant checkpoint (not ldm's own, which drops LoRA gradients); an
        instance `forward` on each block, which `preserve_model_state` removes after the job."""
        unet = self.unet
        blocks = [*getattr(unet, "input_blocks", []), getattr(unet, "middle_block", None),
                  *getattr(unet, "output_blocks", [])]  # fmt: skip
        blocks = [b for b in blocks if b is not None]
        for block in blocks:
            if "forward" not in block.__dict__:
                block.forward = _checkpointed(block.forward)
        return bool(blocks)


def _checkpointed(forward: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)  # sampling, caching: nothing to save

    return checkpointed_forward


def standalone_order(targets: list[naming.Target], prefix: str = SD15.unet_prefix,
                     family: ModelFamily = SD15) -> list[naming.Target]:
    """U-Net targets in the diffusers model's module order (the order kohya and the standalone
    backbone create them in). LoRA weights are initialised in target order from the seeded RNG,
    so this order makes the same seed give the same LoRA on both backbones; ldm's and sgm's own
    order differs (input/middle/output blocks; attn1, ff, attn2 inside a transformer block).
    `family`: whose diffusers U-Net gives the order, and in which key space its names are (a
    smaller model of the family, the tiny ones, has a subset of its names, in the same order)."""
    rank = _diffusers_rank(any(t.conv3x3 for t in targets), prefix, family.name)
    if rank is None:
        return targets
    end = len(rank)
    return sorted(targets, key=lambda t: rank.get(t.name, end))


@functools.lru_cache(maxsize=4)
def _diffusers_rank(conv: bool, prefix: str, family_name: str = SD15.name) -> dict[str, int] | None:
    try:
        from diffusers import UNet2DConditionModel

        from lib_lora.training.family import family_by_name
        from lib_lora.training.models import sd15_unet_config
        from lib_lora.training.tiny_model import sdxl_configs
    except ImportError:  # the order is a nicety (reproducibility across hosts), not a need
        return None
    family = family_by_name(family_name)
    full = sd15_unet_config() if family is SD15 else sdxl_configs(full_size=True)[0]
    config = {k: v for k, v in full.items() if not k.startswith("_")}
    with torch.device("meta"):  # names only: no memory, no weights
        unet = UNet2DConditionModel(**config)
    return {t.name: i for i, t in enumerate(naming.unet_targets(unet, conv, prefix, family.unet_key_space))}


# --------------------------------------------------------------------------------------------
# The module tree, exactly as it was: what training may add or change, taken back afterwards.

# ldm's own (reentrant) checkpointing, and transformers' (CLIPEncoder), both given back as found.
_CHECKPOINT_FLAGS = ("checkpoint", "use_checkpoint", "gradient_checkpointing")


@dataclass
class _ModuleState:
    module: nn.Module
    training: bool
    children: list[str]
    params: list[str]
    buffers: list[str]
    hooks: dict[str, list[int]]
    forward: Any  # the instance-level `forward` override, or _NONE
    flags: dict[str, Any] = field(default_factory=dict)


_NONE = object()
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
               "_load_state_dict_pre_hooks")


def _snapshot(root: nn.Module) -> tuple[list[_ModuleState], list[tuple[nn.Parameter, bool]]]:
    modules = []
    for m in root.modules():
        modules.append(_ModuleState(
            module=m,
            training=m.training,
            children=list(m._modules),
            params=list(m._parameters),
            buffers=list(m._buffers),
            hooks={h: list(getattr(m, h)) for h in _HOOK_DICTS if isinstance(getattr(m, h, None), dict)},
            forward=m.__dict__.get("forward", _NONE),
            flags={f: m.__dict__[f] for f in _CHECKPOINT_FLAGS if isinstance(m.__dict__.get(f), bool)},
        ))
    params = [(p, p.requires_grad) for p in root.parameters()]
    return modules, params


def _restore(modules: list[_ModuleState], params: list[tuple[nn.Parameter, bool]]) -> None:
    for s in modules:
        m = s.module
        for extra in [k for k in m._modules if k not in s.children]:
            del m._modules[extra]
        for extra in [k for k in m._parameters if k not in s.params]:
            del m._parameters[extra]
        for extra in [k for k in m._buffers if k not in s.buffers]:
            del m._buffers[extra]
        for name, keys in s.hooks.items():
            hooks = getattr(m, name)
            for extra in [k for k in hooks if k not in keys]:
                del hooks[extra]
        if s.forward is _NONE:
            m.__dict__.pop("forward", None)
        else:
            m.__dict__["forward"] = s.forward
        for flag, value in s.flags.items():
            setattr(m, flag, value)
        m.training = s.training
    for p, requires_grad in params:
        p.grad = None
        p.requires_grad_(requires_grad)


@contextlib.contextmanager
def preserve_model_state(root: nn.Module) -> Iterator[None]:
    """Freeze `root` for LoRA training and give it back exactly as it was, on success, on an
    exception and on an interrupt: requires_grad, train/eval flags, ldm checkpoint flags, and
    no hook, child module, parameter, buffer or forward override added meanwhile survives.

    Inside, every parameter is frozen (the WebUI never freezes its U-Net), modules are in eval
    mode, and ldm's own reentrant gradient checkpointing is off: it recomputes with only the
    block's registered parameters, so gradients would never reach LoRA weights wrapped around it.
    """
    modules, params = _snapshot(root)
    try:
        for p, _ in params:
            p.requires_grad_(False)
        for s in modules:
            for flag in s.flags:
                setattr(s.module, flag, False)
        root.eval()
        yield
    finally:
        _restore(modules, params)
