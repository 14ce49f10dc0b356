"""diffusers/transformers state dicts -> the single-file layouts Stable Diffusion checkpoints use.

The WebUI, ComfyUI, kohya and diffusers' `from_single_file` all read one `.safetensors` whose
keys follow the original code's module tree: compvis (`ldm`, SD1.5) or sgm (SDXL). These
functions write that layout from modules built with diffusers and transformers:

- U-Net (`UNet2DConditionModel` -> `openaimodel.UNetModel`): the down path is one flat list
  `input_blocks.N` (conv_in, then per level its layers and a down-sampler), the up path
  `output_blocks.N`, the middle `middle_block.0/1/2`; inside a layer the ResNet parts are renamed,
  attention (`Transformer2DModel` / `SpatialTransformer`) keeps its names. Per-level transformer
  depth and levels without attention follow from the names; SDXL's pooled-text/size embedding
  (`add_embedding`) is `label_emb.0.0/0.2`.
- VAE (`AutoencoderKL`): `down_blocks.i.resnets.j` -> `down.i.block.j`, the decoder's up levels
  in reverse order, and the mid attention's q/k/v/proj_out stored as 1x1 convs.
- CLIP text models: the HF layout as is (SD1.5, SDXL's first encoder) or, for SDXL's second
  encoder, OpenCLIP's (`transformer.resblocks.N`, q/k/v fused into `in_proj`, the projection
  stored as the matrix `x @ text_projection` multiplies by).

A key these functions do not know raises ValueError: a file with a silently dropped weight
would load with that weight at its random init.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

SD15_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "te": "cond_stage_model.transformer."}
SDXL_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "te1": "conditioner.embedders.0.transformer.",
    "te2": "conditioner.embedders.1.model.",
}
# OpenCLIP's CLIP holds the contrastive temperature beside the text tower; sgm's embedder keeps
# it (it deletes only the vision tower), so SDXL files carry it: its init value, ln(1/0.07).
OPEN_CLIP_LOGIT_SCALE = math.log(1 / 0.07)

_RESNET = {  # diffusers ResnetBlock2D -> ldm ResBlock
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL: pooled text + size/crop embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",  # class_embed_type "timestep"/"projection"
    "class_embedding.linear_2": "label_emb.0.2",
    "class_embedding": "label_emb",  # num_class_embeds: an nn.Embedding
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _split(key: str, heads: Mapping[str, str]) -> tuple[str, str] | None:
    """(mapped head, rest) for the longest head of `heads` that `key` starts with."""
    for head in sorted(heads, key=len, reverse=True):
        if key == head or key.startswith(head + "."):
            return heads[head], key[len(head):]
    return None


def _resnet_part(rest: str, parts: Mapping[str, str], key: str) -> str:
    hit = _split(rest.lstrip("."), parts)
    if hit is None:
        raise ValueError(f"not a ResNet weight this layout knows: {key!r}")
    return "." + hit[0] + hit[1]


def _layers_per_block(config: Mapping) -> int:
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):  # the original UNetModel has one num_res_blocks for all levels here
        raise ValueError(f"per-level layers_per_block {layers!r} has no single-file layout")
    return layers


def unet_key_to_compvis(key: str, config: Mapping) -> str:
    """The compvis/sgm key (without the `model.diffusion_model.` prefix) of a diffusers U-Net key."""
    top = _split(key, _UNET_TOP)
    if top is not None:
        return top[0] + top[1]
    per = _layers_per_block(config) + 1  # a level's layers plus its sampler slot
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(\..+)$", key)
    if m:
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            if not rest.startswith(".conv."):
                raise ValueError(f"unknown down-sampler weight {key!r}")
            return f"input_blocks.{1 + level * per + per - 1}.0.op{rest[len('.conv'):]}"
        n = 1 + level * per + j
        return f"input_blocks.{n}.0{_resnet_part(rest, _RESNET, key)}" if kind == "resnets" else f"input_blocks.{n}.1{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(\..+)$", key)
    if m:
        if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"mid block {config.get('mid_block_type')!r} has no single-file layout here")
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":  # ResBlock, SpatialTransformer, ResBlock
            return f"middle_block.1{rest}"
        return f"middle_block.{2 * j}{_resnet_part(rest, _RESNET, key)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(\..+)$", key)
    if m:
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            if not rest.startswith(".conv."):
                raise ValueError(f"unknown up-sampler weight {key!r}")
            # the up-sampler closes the level's last layer, after its attention when it has one
            slot = 2 if "CrossAttn" in config["up_block_types"][level] else 1
            return f"output_blocks.{level * per + per - 1}.{slot}{rest}"
        n = level * per + j
        return f"output_blocks.{n}.0{_resnet_part(rest, _RESNET, key)}" if kind == "resnets" else f"output_blocks.{n}.1{rest}"
    raise ValueError(f"not a UNet2DConditionModel weight this layout knows: {key!r}")


def unet_to_compvis(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers U-Net state dict in the compvis/sgm layout (keys without prefix)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = unet_key_to_compvis(key, config)
        if new in out:
            raise ValueError(f"two U-Net weights map to {new!r}")
        out[new] = value
    return out


_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}


def _vae_mid(side: str, rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    m = re.match(r"resnets\.(\d+)(\..+)$", rest)
    if m:
        part = _resnet_part(m[2], _VAE_RESNET, f"{side}.mid_block.{rest}")
        return f"{side}.mid.block_{int(m[1]) + 1}{part}", value
    m = re.match(r"attentions\.0\.(.+)$", rest)
    if m:
        hit = _split(m[1], _VAE_ATTN)
        if hit is None:
            raise ValueError(f"unknown VAE attention weight {rest!r}")
        name, tail = hit
        if name != "norm" and tail == ".weight":  # ldm's AttnBlock uses 1x1 convs
            value = value.reshape(*value.shape, 1, 1)
        return f"{side}.mid.attn_1.{name}{tail}", value
    raise ValueError(f"unknown VAE mid-block weight {side}.mid_block.{rest}")


def vae_to_compvis(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the compvis layout (keys without prefix)."""
    up_levels = 1 + max(
        (int(m[1]) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1
    )
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        top = _split(key, _VAE_TOP)
        if top is not None:
            new = top[0] + top[1]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.(.+)$", key):
            new, value = _vae_mid(m[1], m[2], value)
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)(\..+)$", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}{_resnet_part(m[3], _VAE_RESNET, key)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv(\..+)$", key):
            new = f"encoder.down.{m[1]}.downsample.conv{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)(\..+)$", key):
            # ldm's decoder numbers its levels from the latent side's opposite end
            new = f"decoder.up.{up_levels - 1 - int(m[1])}.block.{m[2]}{_resnet_part(m[3], _VAE_RESNET, key)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv(\..+)$", key):
            new = f"decoder.up.{up_levels - 1 - int(m[1])}.upsample.conv{m[2]}"
        else:
            raise ValueError(f"not an AutoencoderKL weight this layout knows: {key!r}")
        if new in out:
            raise ValueError(f"two VAE weights map to {new!r}")
        out[new] = value
    return out


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding": "token_embedding",
    "text_model.final_layer_norm": "ln_final",
}


def clip_to_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection state dict in OpenCLIP's text-tower layout
    (keys without prefix), as SDXL's second text encoder is stored."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):  # a constant buffer; OpenCLIP has none
            continue
        top = _split(key, _OPEN_CLIP_TOP)
        if top is not None:
            out[top[0] + top[1]] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value  # an nn.Parameter, not an Embedding
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()  # OpenCLIP computes x @ text_projection
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key):
            fused.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = value
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)$", key):
            hit = _split(m[2], _OPEN_CLIP_LAYER)
            if hit is None:
                raise ValueError(f"not a CLIP text layer weight this layout knows: {key!r}")
            out[f"transformer.resblocks.{m[1]}.{hit[0]}{hit[1]}"] = value
        else:
            raise ValueError(f"not a CLIP text model weight this layout knows: {key!r}")
    for key, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{key}: q, k and v are needed to fuse, got {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)  # nn.MultiheadAttention's order
    out["logit_scale"] = torch.tensor(OPEN_CLIP_LOGIT_SCALE, dtype=torch.float32)
    return out


def _prefixed(prefix: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state_dict.items()}


def sd15_single_file(
    unet: Mapping[str, torch.Tensor], unet_config: Mapping, vae: Mapping[str, torch.Tensor], text_encoder: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One compvis state dict (SD1.5 single-file layout) from the three parts' diffusers/HF state dicts."""
    p = SD15_PREFIXES
    return {
        **_prefixed(p["unet"], unet_to_compvis(unet, unet_config)),
        **_prefixed(p["vae"], vae_to_compvis(vae)),
        **_prefixed(p["te"], dict(text_encoder)),
    }


def sdxl_single_file(
    unet: Mapping[str, torch.Tensor],
    unet_config: Mapping,
    vae: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor],
    text_encoder_2: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """One sgm state dict (SDXL single-file layout): TE1 in the HF layout, TE2 in OpenCLIP's."""
    p = SDXL_PREFIXES
    return {
        **_prefixed(p["unet"], unet_to_compvis(unet, unet_config)),
        **_prefixed(p["vae"], vae_to_compvis(vae)),
        **_prefixed(p["te1"], dict(text_encoder)),
        **_prefixed(p["te2"], clip_to_open_clip(text_encoder_2)),
    }
