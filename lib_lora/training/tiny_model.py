"""A tiny SD1.5-shaped model, built once from the real ldm classes into a single-file checkpoint.

Same block layout and module types as SD1.5 (4 U-Net levels, 2 layers each, spatial
transformers at the first three levels and the middle, a 12-layer CLIP text model), so the
same 192 + 72 kohya LoRA names apply; only the widths are tiny. It is written as a compvis
`.safetensors` and loaded through the same single-file path as a downloaded checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from lib_lora.atomic import atomic_path
from lib_lora.training.tokenizer import cache_dir

TINY_VERSION = 1
TINY_SEED = 1234
TINY_CONTEXT_DIM = 64

# Constructor kwargs of ldm.modules.diffusionmodules.openaimodel.UNetModel (SD1.5's yaml, narrowed).
TINY_LDM_UNET_KWARGS: dict = {
    "image_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 2, 2],
    "num_heads": 8,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": TINY_CONTEXT_DIM,
    "use_checkpoint": False,
    "legacy": False,
}

# ddconfig of ldm's AutoencoderKL (Encoder/Decoder kwargs), narrowed; 3 down-samplings = /8.
TINY_LDM_VAE_KWARGS: dict = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 64,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 1, 2, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def tiny_clip_config():
    """transformers CLIPTextConfig of the tiny text encoder (real vocabulary, 12 layers)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TINY_CONTEXT_DIM,
        intermediate_size=4 * TINY_CONTEXT_DIM,
        num_hidden_layers=12,
        num_attention_heads=TINY_CONTEXT_DIM // 64,  # OpenAI CLIP: 64 dims per head
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=TINY_CONTEXT_DIM,
    )


class TinyVAE(nn.Module):
    """ldm's AutoencoderKL module layout (encoder, decoder, quant convs) without its trainer."""

    def __init__(self, ddconfig: dict):
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    # ldm zero-initialises output layers (zero_module); a model whose output does not depend on
    # its inputs cannot teach a LoRA anything, so every weight gets a fan-in scaled normal.
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            p.data = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
        elif name.endswith("bias"):
            p.data = torch.randn(p.shape, generator=gen) * 0.02


def build_tiny_state_dict(seed: int = TINY_SEED) -> dict[str, torch.Tensor]:
    """The compvis-keyed state dict of the tiny model, deterministic in `seed`."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextModel

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNetModel(**TINY_LDM_UNET_KWARGS)
        vae = TinyVAE(TINY_LDM_VAE_KWARGS)
        clip = CLIPTextModel(tiny_clip_config())
    for m in (unet, vae, clip):
        _randomize(m, gen)
    sd: dict[str, torch.Tensor] = {}
    for prefix, m in (("model.diffusion_model.", unet), ("first_stage_model.", vae), ("cond_stage_model.transformer.", clip)):
        for k, v in m.state_dict().items():
            sd[prefix + k] = v.detach().to(torch.float32).contiguous()
    # transformers < 4.31 saved CLIP's position_ids buffer (as SD1.5 files have it), later ones
    # do not: add it, so the file is the same bytes whichever transformers builds it.
    pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    sd.setdefault(pos, torch.arange(tiny_clip_config().max_position_embeddings, dtype=torch.float32)[None])
    return sd


def ensure_tiny_checkpoint(folder: Path | None = None) -> Path:
    """Path of the tiny single-file checkpoint, writing it (atomically) on first use."""
    from safetensors.torch import save_file

    folder = Path(folder) if folder is not None else cache_dir() / "models"
    path = folder / f"tiny_sd15_v{TINY_VERSION}.safetensors"
    if path.is_file():
        return path
    sd = build_tiny_state_dict()
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={"fastlora_tiny": str(TINY_VERSION)})
    return path
