"""The tiny models' layout as the original `ldm` classes take it (SD1.5's compvis code, which
the WebUI runs): constructor kwargs derived from the diffusers configs the tiny model is built
from, and the VAE module tree. Test-only: `ldm` comes with the test set-up, not the package."""

from __future__ import annotations

from torch import nn

from lib_lora.training.tiny_model import sd15_configs


def ldm_unet_kwargs(cfg: dict) -> dict:
    """ldm.modules.diffusionmodules.openaimodel.UNetModel kwargs of an SD1.5-layout diffusers U-Net config."""
    base = cfg["block_out_channels"][0]
    return {
        "image_size": 8,
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "model_channels": base,
        # ldm names a level by its down-sampling factor 2**level
        "attention_resolutions": [2**i for i, t in enumerate(cfg["down_block_types"]) if t.startswith("CrossAttn")],
        "num_res_blocks": cfg["layers_per_block"],
        "channel_mult": [c // base for c in cfg["block_out_channels"]],
        "num_heads": cfg["attention_head_dim"],  # diffusers' name for the number of heads
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": cfg["cross_attention_dim"],
        "use_checkpoint": False,
        "legacy": False,
    }


def ldm_vae_ddconfig(cfg: dict) -> dict:
    """ddconfig (Encoder/Decoder kwargs) of ldm's AutoencoderKL for a diffusers AutoencoderKL config."""
    base = cfg["block_out_channels"][0]
    return {
        "double_z": True,
        "z_channels": cfg["latent_channels"],
        "resolution": 64,
        "in_channels": cfg["in_channels"],
        "out_ch": cfg["out_channels"],
        "ch": base,
        "ch_mult": [c // base for c in cfg["block_out_channels"]],
        "num_res_blocks": cfg["layers_per_block"],
        "attn_resolutions": [],  # the mid-block attention is always there
        "dropout": 0.0,
    }


_unet_cfg, _vae_cfg, _ = sd15_configs(full_size=False)
TINY_LDM_UNET_KWARGS = ldm_unet_kwargs(_unet_cfg)
TINY_LDM_VAE_KWARGS = ldm_vae_ddconfig(_vae_cfg)


class LdmVAE(nn.Module):
    """ldm's AutoencoderKL module layout (encoder, decoder, quant convs) without its trainer."""

    def __init__(self, ddconfig: dict):
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
