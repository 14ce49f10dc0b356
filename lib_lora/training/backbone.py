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

    def lora_targets(self, conv: bool = False) -> list[tuple[str, nn.Module]]:
        """(kohya name, module) pairs: 192 U-Net + 72 text-encoder modules for SD1.5, plus the
        3x3 convs when `conv` is true. Names come from lib_lora.training.naming."""
