"""kohya LoRA names, computed from module trees (never listed by hand).

One function serves training, export and import:
- `find_targets` walks a model and yields the modules a LoRA attaches to, with kohya names;
- for the WebUI's compvis (ldm) U-Net, `compvis_to_diffusers` first maps each module path to
  the diffusers path, so both model families give identical names.

kohya's rule (networks/lora.py): inside each container module of a target class, every
Linear and Conv2d gets a LoRA named `<prefix>_<path with . -> _>`; Linear and 1x1 convs use
the network dim/alpha, 3x3 convs the conv dim/alpha (and are skipped when that is 0).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lib_lora.training.family import SD15, ModelFamily

# Containers whose Linear/Conv2d children get a LoRA.
DIFFUSERS_UNET_CONTAINERS = ("Transformer2DModel",)
DIFFUSERS_UNET_CONV_CONTAINERS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
LDM_UNET_CONTAINERS = ("SpatialTransformer",)
LDM_UNET_CONV_CONTAINERS = ("ResBlock", "Downsample", "Upsample")
CLIP_CONTAINERS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


@dataclass(frozen=True)
class Target:
    name: str  # kohya name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    module: nn.Module  # the nn.Linear or nn.Conv2d the LoRA wraps
    conv3x3: bool  # True: uses conv dim/alpha


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear, or a layer with its interface: Forge builds its U-Net and text encoders from
    its own `Linear` (a plain nn.Module holding `in_features`, `out_features`, a 2-D `weight`
    and `bias`, whose forward is `F.linear(x, weight, bias)`), which is not an nn.Linear."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Linear" and isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int) and isinstance(weight, nn.Parameter)
            and tuple(weight.shape) == (module.out_features, module.in_features))


def kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def find_targets(
    root: nn.Module,
    prefix: str,
    containers: tuple[str, ...],
    conv_containers: tuple[str, ...] = (),
    path_map: Callable[[str], str] | None = None,
) -> list[Target]:
    """Targets under `root`, in module order. `conv_containers` adds the ResNet/sampler convs."""
    targets: list[Target] = []
    seen: set[int] = set()
    wanted = set(containers) | set(conv_containers)
    for cpath, container in root.named_modules():
        cls = type(container).__name__
        if cls not in wanted:
            continue
        for child_path, child in container.named_modules():
            if not (isinstance(child, nn.Conv2d) or is_linear(child)) or id(child) in seen:
                continue
            seen.add(id(child))
            full = f"{cpath}.{child_path}" if cpath else child_path
            is3x3 = isinstance(child, nn.Conv2d) and child.kernel_size != (1, 1)
            if cls in containers and is3x3:
                continue  # kohya gives 3x3 convs inside attention blocks no LoRA (SD1.5 has none)
            targets.append(Target(kohya_name(prefix, path_map(full) if path_map else full), child, is3x3))
    return targets


# --------------------------------------------------------------------------------------------
# compvis (ldm) U-Net paths -> diffusers paths, SD1.5 layout: 4 levels, 2 layers per level.

_RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "label_emb.0.0": "add_embedding.linear_1",  # SDXL's extra vector (pooled text + size embeddings)
    "label_emb.0.2": "add_embedding.linear_2",
}


def _resnet(rest: str) -> str:
    for old, new in _RESNET_PARTS.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def compvis_to_diffusers(path: str, layers_per_block: int = 2) -> str:
    """Map a module path of the ldm UNetModel to the UNet2DConditionModel path.

    Raises ValueError for a path outside the SD1.5 layout.
    """
    for old, new in _TOP.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    per = layers_per_block + 1  # layers plus the sampler slot
    m = re.match(r"input_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m:
        n, k, rest = int(m[1]), int(m[2]), m[3] or ""
        level, j = divmod(n - 1, per)
        if j == layers_per_block:  # the down-sampler that closes level `level`
            return f"down_blocks.{level}.downsamplers.0.conv" + rest[len("op"):]
        if k == 0:
            return _join(f"down_blocks.{level}.resnets.{j}", _resnet(rest))
        return _join(f"down_blocks.{level}.attentions.{j}", rest)
    m = re.match(r"middle_block\.(\d+)(?:\.(.*))?$", path)
    if m:
        k, rest = int(m[1]), m[2] or ""
        if k == 1:
            return _join("mid_block.attentions.0", rest)
        return _join(f"mid_block.resnets.{k // 2}", _resnet(rest))
    m = re.match(r"output_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m:
        n, k, rest = int(m[1]), int(m[2]), m[3] or ""
        level, j = divmod(n, layers_per_block + 1)
        if k == 0:
            return _join(f"up_blocks.{level}.resnets.{j}", _resnet(rest))
        if rest == "conv" or rest.startswith("conv."):  # Upsample: its only child is `conv`
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        return _join(f"up_blocks.{level}.attentions.{j}", rest)
    raise ValueError(f"not an SD1.5 compvis U-Net module path: {path!r}")


def _join(head: str, rest: str) -> str:
    return f"{head}.{rest}" if rest else head


# --------------------------------------------------------------------------------------------
# diffusers U-Net paths -> compvis (ldm/sgm) paths: the inverse of `compvis_to_diffusers`, any
# number of levels. kohya names SDXL LoRAs in the compvis space (sd-scripts trains SDXL on its
# library/sdxl_original_unet.py, whose module paths are sgm's), so an SDXL LoRA trained on
# diffusers modules is named through this map.

_RESNET_PARTS_INV = {new: old for old, new in _RESNET_PARTS.items()}
_TOP_INV = {new: old for old, new in _TOP.items()}


def _resnet_inv(rest: str) -> str:
    for new, old in _RESNET_PARTS_INV.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def diffusers_to_compvis(path: str, up_attention: tuple[bool, ...], layers_per_block: int = 2) -> str:
    """Map a UNet2DConditionModel module path to the ldm/sgm UNetModel path.

    `up_attention[i]`: whether up block i has attentions (an up-sampler follows the attention
    in its compvis block, else the ResNet). Raises ValueError for a path it does not know.
    """
    for new, old in _TOP_INV.items():
        if path == new or path.startswith(new + "."):
            return old + path[len(new):]
    per = layers_per_block + 1
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(?:\.(.*))?$", path)
    if m:
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        if kind == "downsamplers":  # diffusers calls ldm's Downsample `op` conv `conv`
            return _join(f"input_blocks.{per * (level + 1)}.0.op", rest[len("conv."):] if rest.startswith("conv.") else "")
        n = 1 + per * level + j
        return _join(f"input_blocks.{n}.0", _resnet_inv(rest)) if kind == "resnets" else _join(f"input_blocks.{n}.1", rest)
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", path)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3] or ""
        return _join(f"middle_block.{2 * j}", _resnet_inv(rest)) if kind == "resnets" else _join("middle_block.1", rest)
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(?:\.(.*))?$", path)
    if m:
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        if kind == "upsamplers":
            return _join(f"output_blocks.{per * level + layers_per_block}.{2 if up_attention[level] else 1}", rest)
        n = per * level + j
        return _join(f"output_blocks.{n}.0", _resnet_inv(rest)) if kind == "resnets" else _join(f"output_blocks.{n}.1", rest)
    raise ValueError(f"not a diffusers U-Net module path: {path!r}")


def _up_attention(unet: nn.Module) -> tuple[bool, ...]:
    return tuple(hasattr(block, "attentions") for block in unet.up_blocks)


def unet_targets(unet: nn.Module, conv: bool = False, prefix: str = SD15.unet_prefix,
                 key_space: str = SD15.unet_key_space) -> list[Target]:
    """LoRA targets of a U-Net, diffusers or ldm/sgm, under kohya names (`prefix`: the family's
    `unet_prefix`).

    `key_space` is the module naming the kohya names use (the family's `unet_key_space`):
    "diffusers" (SD1.5 LoRAs) or "compvis" (SDXL LoRAs); either module tree can be named in
    either space.
    """
    if key_space not in ("diffusers", "compvis"):
        raise ValueError(f"unknown key space {key_space!r}")
    if any(type(m).__name__ == "SpatialTransformer" for m in unet.modules()):
        convs = LDM_UNET_CONV_CONTAINERS if conv else ()
        path_map = compvis_to_diffusers if key_space == "diffusers" else None
        return find_targets(unet, prefix, LDM_UNET_CONTAINERS, convs, path_map)
    convs = DIFFUSERS_UNET_CONV_CONTAINERS if conv else ()
    if key_space == "diffusers":
        return find_targets(unet, prefix, DIFFUSERS_UNET_CONTAINERS, convs)
    up_attention = _up_attention(unet)
    layers = unet.config.layers_per_block if hasattr(unet, "config") else 2

    def to_compvis(path: str) -> str:
        return diffusers_to_compvis(path, up_attention, layers)

    return find_targets(unet, prefix, DIFFUSERS_UNET_CONTAINERS, convs, to_compvis)


def text_encoder_targets(text_encoder: nn.Module, prefix: str = SD15.text_encoders[0].kohya_prefix) -> list[Target]:
    """LoRA targets of a transformers CLIPTextModel (72 for SD1.5's ViT-L/14 text model);
    `prefix` is the encoder's kohya prefix in its family (lora_te, lora_te1, lora_te2)."""
    return find_targets(text_encoder, prefix, CLIP_CONTAINERS)


def family_targets(family: ModelFamily, unet: nn.Module, text_encoders: list[nn.Module] | tuple[nn.Module, ...],
                   conv: bool = False) -> list[Target]:  # fmt: skip
    """A backbone's targets: the U-Net's, then each text encoder's under its family prefix."""
    if len(text_encoders) != len(family.text_encoders):
        raise ValueError(f"{family.label} has {len(family.text_encoders)} text encoders, got {len(text_encoders)}")
    targets = unet_targets(unet, conv, family.unet_prefix, family.unet_key_space)
    for spec, te in zip(family.text_encoders, text_encoders, strict=True):
        targets += text_encoder_targets(te, spec.kohya_prefix)
    return targets
