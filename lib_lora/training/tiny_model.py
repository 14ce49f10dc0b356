"""The built-in tiny models (`tiny` SD1.5, `tiny-sdxl`), and the full-size architectures with
random weights for benches, all built from diffusers/transformers classes.

Same block layout and module types as the real model, only narrower: tiny SD1.5 has 4 U-Net
levels of 2 layers with cross-attention at the first three and the middle, and a 12-layer CLIP
text model (so the same 192 + 72 kohya LoRA names apply); tiny-sdxl has SDXL's 3 levels (no
attention at the first), its text_time embedding and two text encoders (12 and 32 layers).
Each is written as the single-file `.safetensors` a downloaded checkpoint is (compvis layout for
SD1.5, sgm for SDXL; `checkpoint_layout`) and loaded through the same path as one.

Weights are a function of the seed and each weight's name only (every tensor is drawn from its
own generator), not of the classes' init order or of the library versions.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from lib_lora.atomic import atomic_path
from lib_lora.training.tokenizer import cache_dir

TINY_VERSION = 2
TINY_SEED = 1234
FAMILIES = ("sd15", "sdxl")

# ---- SD1.5 tiny widths (the full-size values are the configs in training/configs/) ---------
TINY_CONTEXT_DIM = 64
TINY_SD15_UNET = {"block_out_channels": [32, 64, 64, 64], "cross_attention_dim": TINY_CONTEXT_DIM}
TINY_SD15_VAE = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1}

# ---- SDXL base 1.0 -----------------------------------------------------------------------
# Source: Stability-AI/generative-models configs/inference/sd_xl_base.yaml (network_config:
# model_channels 320, channel_mult [1, 2, 4], attention_resolutions [4, 2] (no attention at the
# first level), transformer_depth [1, 2, 10] (the middle uses the last), num_head_channels 64,
# use_linear_in_transformer, context_dim 2048, adm_in_channels 2816 = 1280 pooled + 6 x 256;
# first_stage_config ch 128, ch_mult [1, 2, 4, 4], num_res_blocks 2; scale_factor 0.13025;
# embedders: CLIP ViT-L/14 text, OpenCLIP ViT-bigG-14 text), in diffusers' config names
# (attention_head_dim is diffusers' name for the number of heads: channels / 64).
SDXL_UNET = {
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
}
SDXL_VAE = {"scaling_factor": 0.13025, "sample_size": 1024, "force_upcast": True}
# OpenCLIP ViT-bigG-14's text tower (open_clip model_configs/ViT-bigG-14.json: width 1280,
# heads 20, layers 32, embed_dim 1280; nn.GELU) as transformers' CLIPTextConfig.
SDXL_TE2 = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
            "hidden_act": "gelu", "projection_dim": 1280}
# tiny-sdxl: the same layout, narrow; TE2 wider than TE1 so a swapped pair cannot fit.
TINY_SDXL_TE1_HIDDEN = 64
TINY_SDXL_TE2_HIDDEN = 128
TINY_SDXL_TIME_DIM = 16
TINY_SDXL_UNET = {
    "block_out_channels": [32, 64, 64],
    # A file cannot say its head count: loaders (ours, the WebUI's, ComfyUI's) take SDXL's 64
    # channels per head, at least one; so does the tiny model, or it would compute otherwise.
    "attention_head_dim": [1, 1, 1],
    "transformer_layers_per_block": [1, 2, 2],
    "cross_attention_dim": TINY_SDXL_TE1_HIDDEN + TINY_SDXL_TE2_HIDDEN,
    "addition_time_embed_dim": TINY_SDXL_TIME_DIM,
    "projection_class_embeddings_input_dim": TINY_SDXL_TE2_HIDDEN + 6 * TINY_SDXL_TIME_DIM,
    "sample_size": 16,
}
# ------------------------------------------------------------------------------------------


def _unet_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _clip_config(hidden: int, layers: int, **extra):
    """SD1.5's CLIPTextConfig (vocabulary, 77 positions, token ids) with other widths."""
    from lib_lora.training.models import sd15_text_encoder_config

    cfg = sd15_text_encoder_config()
    values = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                  num_attention_heads=max(1, hidden // 64), projection_dim=hidden)  # 64 dims per head
    for key, value in {**values, **extra}.items():
        setattr(cfg, key, value)
    return cfg


def tiny_clip_config():
    """transformers CLIPTextConfig of the tiny SD1.5 text encoder (real vocabulary, 12 layers)."""
    return _clip_config(TINY_CONTEXT_DIM, 12)


def sd15_configs(full_size: bool = False) -> tuple[dict, dict, object]:
    """(U-Net config, VAE config, CLIPTextConfig) of SD1.5 or the tiny SD1.5."""
    from lib_lora.training.models import sd15_text_encoder_config, sd15_unet_config, sd15_vae_config

    unet, vae = sd15_unet_config(), sd15_vae_config()
    if full_size:
        return unet, vae, sd15_text_encoder_config()
    return {**unet, **TINY_SD15_UNET}, {**vae, **TINY_SD15_VAE}, tiny_clip_config()


def sdxl_configs(full_size: bool = False) -> tuple[dict, dict, object, object]:
    """(U-Net config, VAE config, TE1 CLIPTextConfig, TE2 CLIPTextConfig) of SDXL base 1.0 or tiny-sdxl."""
    from lib_lora.training.models import sd15_text_encoder_config, sd15_unet_config, sd15_vae_config

    unet = {**sd15_unet_config(), **SDXL_UNET}
    vae = {**sd15_vae_config(), **SDXL_VAE}
    if full_size:
        te2 = _clip_config(SDXL_TE2["hidden_size"], SDXL_TE2["num_hidden_layers"], **SDXL_TE2)
        return unet, vae, sd15_text_encoder_config(), te2
    te1 = _clip_config(TINY_SDXL_TE1_HIDDEN, 12)
    te2 = _clip_config(TINY_SDXL_TE2_HIDDEN, SDXL_TE2["num_hidden_layers"], hidden_act=SDXL_TE2["hidden_act"])
    return {**unet, **TINY_SDXL_UNET}, {**vae, **TINY_SD15_VAE}, te1, te2


def build_sd15_modules(full_size: bool = False, device: str | torch.device = "meta"):
    """(UNet2DConditionModel, AutoencoderKL, CLIPTextModel) of SD1.5 (or tiny), weights unset
    on the meta device (only shapes; `random_state_dict` or `to_empty` + a load gives values)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet_cfg, vae_cfg, te_cfg = sd15_configs(full_size)
    with torch.device(device):
        return (UNet2DConditionModel(**_unet_kwargs(unet_cfg)), AutoencoderKL(**_unet_kwargs(vae_cfg)),
                CLIPTextModel(te_cfg))


def build_sdxl_modules(full_size: bool = False, device: str | torch.device = "meta"):
    """(UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection) of
    SDXL base 1.0 (full_size) or tiny-sdxl, on `device` (meta: shapes only, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet_cfg, vae_cfg, te1_cfg, te2_cfg = sdxl_configs(full_size)
    with torch.device(device):
        return (UNet2DConditionModel(**_unet_kwargs(unet_cfg)), AutoencoderKL(**_unet_kwargs(vae_cfg)),
                CLIPTextModel(te1_cfg), CLIPTextModelWithProjection(te2_cfg))


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}|{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def draw_weight(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """One weight, from a generator of its own (seeded by `seed` and `name`): fan-in scaled
    normal for matrices and kernels, small normal biases, norm scales of one. The real models'
    zero-initialised output layers are drawn too: a model whose output ignores its input cannot
    teach a LoRA anything."""
    if name.endswith("bias"):
        return torch.randn(shape, generator=_generator(seed, name)) * 0.02
    if len(shape) >= 2:
        return torch.randn(shape, generator=_generator(seed, name)) / math.sqrt(math.prod(shape[1:]))
    if len(shape) == 1:  # GroupNorm / LayerNorm scale
        return torch.ones(shape)
    raise ValueError(f"no rule to draw the scalar weight {name!r}")


def random_state_dict(module: torch.nn.Module, seed: int, scope: str) -> dict[str, torch.Tensor]:
    """float32 values for every parameter of `module` (meta or not), named as in its state
    dict; `scope` keeps the parts' names apart. CLIP's position_ids buffer is left out
    (transformers saves it in some versions, not in others)."""
    params = dict(module.named_parameters())
    buffers = {k for k in module.state_dict() if k not in params and not k.endswith("position_ids")}
    if buffers:
        raise ValueError(f"{type(module).__name__} has buffers with no rule: {sorted(buffers)[:3]}")
    return {k: draw_weight(f"{scope}.{k}", p.shape, seed) for k, p in params.items()}


def _position_ids(te_cfg) -> torch.Tensor:
    # CLIP's constant buffer, int64 as SD1.5/SDXL files carry it (transformers < 4.31 saved it)
    return torch.arange(te_cfg.max_position_embeddings, dtype=torch.int64)[None]


def random_single_file(family: str = "sd15", full_size: bool = False, seed: int = TINY_SEED) -> dict[str, torch.Tensor]:
    """The single-file state dict (compvis for sd15, sgm for sdxl) of the family's model with
    weights drawn from `seed`: the tiny model's file, or full-size random weights for benches."""
    from lib_lora.training.checkpoint_layout import (
        SD15_PREFIXES,
        SDXL_PREFIXES,
        sd15_single_file,
        sdxl_single_file,
    )

    if family == "sd15":
        unet, vae, te = build_sd15_modules(full_size)
        sd = sd15_single_file(random_state_dict(unet, seed, "unet"), unet.config, random_state_dict(vae, seed, "vae"),
                              random_state_dict(te, seed, "te"))
        sd[SD15_PREFIXES["te"] + "text_model.embeddings.position_ids"] = _position_ids(te.config)
        return sd
    if family == "sdxl":
        unet, vae, te1, te2 = build_sdxl_modules(full_size)
        sd = sdxl_single_file(random_state_dict(unet, seed, "unet"), unet.config, random_state_dict(vae, seed, "vae"),
                              random_state_dict(te1, seed, "te1"), random_state_dict(te2, seed, "te2"))
        sd[SDXL_PREFIXES["te1"] + "text_model.embeddings.position_ids"] = _position_ids(te1.config)
        return sd
    raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")


def build_tiny_state_dict(seed: int = TINY_SEED, family: str = "sd15") -> dict[str, torch.Tensor]:
    """The single-file state dict of the tiny model of `family`, deterministic in `seed`."""
    return random_single_file(family, full_size=False, seed=seed)


def tiny_checkpoint_name(family: str = "sd15") -> str:
    return f"tiny_{family}_v{TINY_VERSION}.safetensors"


def ensure_tiny_checkpoint(folder: Path | None = None, family: str = "sd15") -> Path:
    """Path of the tiny single-file checkpoint of `family` ("sd15" or "sdxl"), written
    (atomically) on first use."""
    from safetensors.torch import save_file

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    folder = Path(folder) if folder is not None else cache_dir() / "models"
    path = folder / tiny_checkpoint_name(family)
    if path.is_file():
        return path
    sd = {k: v.contiguous() for k, v in build_tiny_state_dict(family=family).items()}
    with atomic_path(path) as tmp:
        # one metadata entry: safetensors writes several in hash-map order, which varies per run
        save_file(sd, str(tmp), metadata={"fastlora_tiny": f"{family} v{TINY_VERSION}"})
    return path
