"""The Backbone interface: the model as the training loop sees it.

One implementation wraps diffusers modules (standalone, `DiffusersBackbone`); the WebUI host
has one over its loaded ldm model (trained in place). The loop, the LoRA modules, caption
encoding and export are shared by all of them. Each backbone carries its model family
(`backbone.family`, lib_lora.training.family): chunking, hidden-state choice, latent scale,
schedule and key prefixes are read from there.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from lib_lora.training.family import SD15, ModelFamily


class Backbone(Protocol):
    unet: nn.Module
    text_encoder: nn.Module  # a transformers CLIPTextModel
    tokenizer: object  # a transformers CLIPTokenizer (or compatible)
    device: torch.device
    dtype: torch.dtype  # dtype of the frozen weights
    model_name: str  # file or folder name of the base model, for metadata
    model_hash: str  # sha256 of the base model file ('' when unknown), for metadata
    family: ModelFamily  # SD15 for the SD1.5 backbones

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], (B,3,H,W) -> latents already scaled by `family.latent_scale`, (B,4,H/8,W/8)."""

    def encode_text(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """Token ids (B, n*77) in `family.chunk_length` chunks -> conditioning (B, n*77, 768)."""

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The U-Net's epsilon prediction."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents scaled by `family.latent_scale` -> pixels in [-1, 1] (sample images)."""

    def lora_targets(self, conv: bool = False) -> list[tuple[str, nn.Module]]:
        """`naming.Target`s (kohya name, module, conv3x3): 192 U-Net + 72 text-encoder modules for SD1.5, plus the
        3x3 convs when `conv` is true. Names come from lib_lora.training.naming."""


def encode_text_chunks(
    text_model: nn.Module, input_ids: torch.Tensor, clip_skip: int, *, family: ModelFamily, encoder: int = 0
) -> torch.Tensor:
    """Run a transformers CLIPTextModel over (B, n*77) ids in the family's chunks.

    The hidden state comes from the family's spec of this encoder: for SD1.5, clip_skip N takes
    the hidden state N layers from the end and applies the final layer norm, as kohya and the
    WebUI do; chunks are encoded separately and concatenated.
    """
    spec = family.text_encoders[encoder]
    layer = spec.hidden_layer(clip_skip)
    outs = []
    for chunk in input_ids.split(family.chunk_length, dim=1):
        if layer == 1 and spec.final_layer_norm:
            outs.append(text_model(chunk, return_dict=True).last_hidden_state)
        else:
            hidden = text_model(chunk, output_hidden_states=True, return_dict=True).hidden_states[-layer]
            outs.append(text_model.text_model.final_layer_norm(hidden) if spec.final_layer_norm else hidden)
    return torch.cat(outs, dim=1)


class DiffusersBackbone:
    """The standalone Backbone over diffusers/transformers modules. Base weights are frozen."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, model_name: str = "", model_path=None,
                 family: ModelFamily = SD15):  # fmt: skip
        self.family = family
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.model_name = model_name
        self.model_path = model_path
        self._hash: str | None = None
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        for m in (unet, vae, text_encoder):
            m.requires_grad_(False)
            m.eval()

    @property
    def model_hash(self) -> str:
        """sha256 of the base model file, computed on first use ('' for a folder)."""
        if self._hash is None:
            from pathlib import Path

            from lib_lora.training.models import file_sha256

            p = Path(self.model_path) if self.model_path else None
            self._hash = file_sha256(p) if p is not None and p.is_file() else ""
        return self._hash

    @property
    def model_legacy_hash(self) -> str:
        """The WebUI's old 8-hex model hash of the base model file (kohya's ss_sd_model_hash),
        '' for a folder."""
        from pathlib import Path

        from lib_lora.training.export import legacy_hash

        p = Path(self.model_path) if self.model_path else None
        return legacy_hash(p) if p is not None and p.is_file() else ""

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> DiffusersBackbone:
        self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(self.device, self.dtype)
        return self

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return dist.sample() * self.family.latent_scale

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, self.vae.dtype) / self.family.latent_scale
        return self.vae.decode(z, return_dict=False)[0]

    def encode_text(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        return encode_text_chunks(self.text_encoder, input_ids.to(self.device), clip_skip, family=self.family)

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=cond, return_dict=False)[0]

    def lora_targets(self, conv: bool = False) -> list:
        from lib_lora.training.naming import family_targets

        return family_targets(self.family, self.unet, [self.text_encoder], conv)
