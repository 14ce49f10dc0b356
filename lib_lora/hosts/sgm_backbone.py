"""The Backbone over the WebUI's loaded SDXL model (an sgm `DiffusionEngine`), trained in place.

A1111 holds SDXL as generative-models' `DiffusionEngine`: the U-Net at `model.diffusion_model`
(sgm's openaimodel layout, the compvis names kohya's SDXL LoRAs use), the VAE at
`first_stage_model`, and `conditioner.embedders`: [0] a CLIP ViT-L text model
(`.transformer`, a transformers CLIPTextModel), [1] OpenCLIP bigG's text tower (`.model`, with
fused `nn.MultiheadAttention` projections), then one Fourier embedder per size/crop id pair.
A1111 wraps each text embedder (`.wrapped`); we take the wrapped one and tokenize captions
ourselves, so prompt emphasis in captions is never parsed.

Text conditioning is what sgm's conditioner computes for training: TE1's hidden state
`layer_idx` (11: the penultimate), TE2's penultimate through the embedder's own
`encode_with_transformer`, pooled = `text_projection` of the final-normed end-of-text token;
the U-Net's `y` vector is the pooled embedding followed by the host's own size embedders' outputs.

Text encoder 2 gets no LoRA here: its attention is one fused `nn.MultiheadAttention`, which calls
its `in_proj_weight` directly, so a LoRA on `q_proj`/`k_proj`/`v_proj` would need the module's
forward replaced; only the U-Net and text encoder 1 are trained in place (`TE2_NOT_TRAINED`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from lib_lora.hosts.ldm_backbone import _checkpointed, preserve_model_state, standalone_order, weights_hash
from lib_lora.training import naming
from lib_lora.training.backbone_sdxl import TextConditioning, te2_input_ids
from lib_lora.training.family import SDXL, ModelFamily

__all__ = ["SgmBackbone", "TE2_NOT_TRAINED", "is_sgm_sdxl", "preserve_model_state"]

TE2_NOT_TRAINED = (
    "Text encoder 2 is not trained on the WebUI's loaded SDXL model (its attention is OpenCLIP's fused "
    "projection, which a LoRA cannot wrap in place); the U-Net and text encoder 1 are."
)
# sgm's GeneralConditioner input keys of the size/crop embedders, in the order of the 6 time ids
_SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


def _unwrap(embedder: nn.Module) -> nn.Module:
    return getattr(embedder, "wrapped", embedder)


def is_sgm_sdxl(sd_model: Any) -> bool:
    """An sgm model with SDXL base's two text embedders (CLIP `.transformer`, OpenCLIP `.model`)."""
    embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", None)
    if embedders is None or len(embedders) < 2:
        return False
    te1, te2 = _unwrap(embedders[0]), _unwrap(embedders[1])
    return hasattr(te1, "transformer") and hasattr(te2, "model") and hasattr(te2, "encode_with_transformer")


class SgmBackbone:
    """`lib_lora.training.backbone_sdxl.SDXLBackbone`'s interface over an sgm DiffusionEngine,
    its weights used in place."""

    family: ModelFamily = SDXL

    def __init__(self, sd_model: nn.Module, model_name: str = "", model_hash: str = "",
                 device: torch.device | None = None, model_legacy_hash: str = "") -> None:
        if not is_sgm_sdxl(sd_model):
            from lib_lora.errors import ModelLoadError

            raise ModelLoadError("The loaded checkpoint is not an SDXL base model (two text encoders); load one.")
        self.sd_model = sd_model
        self.unet: nn.Module = sd_model.model.diffusion_model
        embedders = list(sd_model.conditioner.embedders)
        self.te1_embedder, self.te2_embedder = _unwrap(embedders[0]), _unwrap(embedders[1])
        self.text_encoder: nn.Module = self.te1_embedder.transformer
        self.tokenizer = self.te1_embedder.tokenizer
        self.text_encoder_2: nn.Module = self.te2_embedder.model
        # the y vector's parts after the pooled embedding, in the conditioner's order
        self.size_embedders = [e for e in map(_unwrap, embedders) if getattr(e, "input_key", None) in _SIZE_KEYS]
        if [e.input_key for e in self.size_embedders] != list(_SIZE_KEYS):
            from lib_lora.errors import ModelLoadError

            raise ModelLoadError("The loaded SDXL model lacks size and crop conditioning (a refiner?); load an SDXL base model.")
        first = next(self.unet.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = first.dtype
        self.model_name = model_name
        self.model_hash = model_hash
        self.model_legacy_hash = model_legacy_hash

    @functools.cached_property
    def vae_identity(self) -> str:
        return weights_hash(f"sgm-vae|{self.vae_dtype()}|{self.sd_model.scale_factor}", self.sd_model.first_stage_model)

    # -- images ------------------------------------------------------------------------------
    def vae_dtype(self) -> torch.dtype:
        return next(self.sd_model.first_stage_model.parameters()).dtype

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> latents x the host's scale factor (sgm's encode_first_stage scales)."""
        x = pixels.to(self.device, self.vae_dtype())
        return self.sd_model.get_first_stage_encoding(self.sd_model.encode_first_stage(x)).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.sd_model.decode_first_stage(latents.to(self.device, self.vae_dtype())).float()

    # -- text --------------------------------------------------------------------------------
    def encode_text(self, input_ids: torch.Tensor, clip_skip: int = 1,
                    input_ids_2: torch.Tensor | None = None) -> TextConditioning:
        """Token ids (B, n*77) -> (context (B, n*77, TE1 + TE2 width), pooled (B, TE2 projection)).

        Each 77-token chunk on its own, chunks concatenated; pooled from the first chunk (as
        the WebUI and kohya do). clip_skip does not apply to SDXL (the layers are fixed)."""
        del clip_skip
        n = SDXL.chunk_length
        ids = input_ids.to(self.device)
        if input_ids_2 is None:
            input_ids_2 = te2_input_ids(ids, self.tokenizer.eos_token_id, 0)  # OpenCLIP pads with 0
        b = ids.shape[0]
        ids1, ids2 = ids.reshape(-1, n), input_ids_2.to(self.device).reshape(-1, n)
        out1 = self.text_encoder(input_ids=ids1, output_hidden_states=True)
        h1 = out1.hidden_states[self.te1_embedder.layer_idx]
        out2 = self.te2_embedder.encode_with_transformer(ids2)
        h2 = out2[self.te2_embedder.layer]
        pooled = out2["pooled"].reshape(b, -1, out2["pooled"].shape[-1])[:, 0]
        cond = torch.cat([h1.reshape(b, -1, h1.shape[-1]), h2.reshape(b, -1, h2.shape[-1]).to(h1.dtype)], dim=-1)
        return TextConditioning(cond, pooled)

    def y_vector(self, added: dict[str, torch.Tensor]) -> torch.Tensor:
        """sgm's `vector` conditioning: pooled text embedding, then each size embedder's
        Fourier features of its id pair (original size, crop top-left, target size)."""
        pooled, ids = added["text_embeds"], added["time_ids"].to(self.device)
        parts = [pooled] + [e(ids[:, 2 * i:2 * i + 2]) for i, e in enumerate(self.size_embedders)]
        return torch.cat([p.to(self.dtype) for p in parts], dim=1)

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
                      added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if added is None:
            raise ValueError("the SDXL U-Net needs its added conditioning (pooled text embedding and time ids)")
        return self.unet(noisy_latents, timesteps, context=cond, y=self.y_vector(added))

    # -- LoRA --------------------------------------------------------------------------------
    def lora_targets(self, conv: bool = False) -> list[naming.Target]:
        """U-Net targets under kohya's SDXL (compvis) names, in the standalone backbone's order
        (so a seed initialises the same LoRA on every host), then TE1's (`lora_te1_`); no TE2
        (`TE2_NOT_TRAINED`)."""
        fam = self.family
        unet = naming.unet_targets(self.unet, conv, fam.unet_prefix, fam.unet_key_space)
        return standalone_order(unet, fam.unet_prefix, fam) + naming.text_encoder_targets(
            self.text_encoder, fam.text_encoders[0].kohya_prefix)

    def enable_gradient_checkpointing(self) -> bool:
        blocks = [*self.unet.input_blocks, self.unet.middle_block, *self.unet.output_blocks]
        for block in blocks:
            if "forward" not in block.__dict__:
                block.forward = _checkpointed(block.forward)
        return bool(blocks)
