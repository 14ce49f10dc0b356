"""The Backbone interface: the SD1.5 model as the training loop sees it.

One implementation wraps diffusers modules (standalone, `DiffusersBackbone`); the WebUI host
has one over its loaded ldm model (trained in place). The loop, the LoRA modules, caption
encoding and export are shared by all of them.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Backbone(Protocol):
    unet: nn.Module
    text_encoder: nn.Module  # a transformers CLIPTextModel
    tokenizer: object  # a transformers CLIPTokenizer (or compatible)
    device: torch.device
    dtype: torch.dtype  # dtype of the frozen weights
    model_name: str  # file or folder name of the base model, for metadata
    model_hash: str  # sha256 of the base model file ('' when unknown), for metadata

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], (B,3,H,W) -> latents already scaled by 0.18215, (B,4,H/8,W/8)."""

    def encode_text(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """Token ids (B, n*77) in 77-token chunks -> conditioning (B, n*77, 768)."""

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The U-Net's epsilon prediction."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents scaled by 0.18215 -> pixels in [-1, 1] (sample images)."""

    def lora_targets(self, conv: bool = False) -> list[tuple[str, nn.Module]]:
        """`naming.Target`s (kohya name, module, conv3x3): 192 U-Net + 72 text-encoder modules for SD1.5, plus the
        3x3 convs when `conv` is true. Names come from lib_lora.training.naming."""


CHUNK = 77  # CLIP context: BOS + 75 tokens + EOS


def encode_text_chunks(text_model: nn.Module, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Run a transformers CLIPTextModel over (B, n*77) ids in 77-token chunks.

    clip_skip N takes the hidden state N layers from the end and applies the final layer
    norm, as kohya and the WebUI do; chunks are encoded separately and concatenated.
    """
    outs = []
    for chunk in input_ids.split(CHUNK, dim=1):
        if clip_skip <= 1:
            outs.append(text_model(chunk, return_dict=True).last_hidden_state)
        else:
            hidden = text_model(chunk, output_hidden_states=True, return_dict=True).hidden_states[-clip_skip]
            outs.append(text_model.text_model.final_layer_norm(hidden))
    return torch.cat(outs, dim=1)


class DiffusersBackbone:
    """The standalone Backbone over diffusers/transformers modules. Base weights are frozen."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, model_name: str = "", model_path=None):
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
        return dist.sample() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(z, return_dict=False)[0]

    def encode_text(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        return encode_text_chunks(self.text_encoder, input_ids.to(self.device), clip_skip)

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=cond, return_dict=False)[0]

    def lora_targets(self, conv: bool = False) -> list:
        from lib_lora.training.naming import text_encoder_targets, unet_targets

        return unet_targets(self.unet, conv) + text_encoder_targets(self.text_encoder)
