"""The SDXL Backbone over diffusers/transformers modules (standalone).

SDXL differs from SD1.5 in what the U-Net is conditioned on: the context is the penultimate
hidden states of two text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14) side by side, and
an extra vector joins the timestep embedding: bigG's pooled, projected output plus Fourier
features of six "time ids" (original size, crop top-left, target size). What the encoders and
time ids compute follows kohya's sd-scripts, so a LoRA trained here sees what a kohya-trained
one saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from lib_lora.training.backbone import DiffusersBackbone
from lib_lora.training.family import SDXL

SDXL_TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)


class TextConditioning(NamedTuple):
    cond: torch.Tensor  # (B, n*77, TE1 width + TE2 width): the U-Net's context
    pooled: torch.Tensor  # (B, TE2 projection width): bigG's pooled output of the first chunk


def te2_input_ids(input_ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """TE1 ids (B, n*77) -> the ids SDXL's second tokenizer gives for the same captions.

    Both tokenizers share CLIP's vocabulary and differ only in padding: in each 77-token
    chunk, everything after the first end-of-text becomes `pad_id` ("!", 0 for bigG)."""
    chunks = input_ids.reshape(input_ids.shape[0], -1, SDXL.chunk_length)
    is_eos = chunks == eos_id
    seen = is_eos.long().cumsum(-1)
    after_first_eos = (seen > 1) | ((seen == 1) & ~is_eos)
    return torch.where(after_first_eos, torch.full_like(chunks, pad_id), chunks).reshape(input_ids.shape)


def pooled_output(text_encoder_2: nn.Module, last_hidden_state: torch.Tensor, input_ids: torch.Tensor,
                  eos_id: int) -> torch.Tensor:
    """bigG's pooled output: the final-normed hidden state at the first end-of-text token,
    through `text_projection` (kohya library/train_util.py `pool_workaround`; transformers'
    own pooling takes the highest id, which differs when a textual-inversion token is used)."""
    eos_index = (input_ids == eos_id).int().argmax(dim=1)
    rows = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
    pooled = last_hidden_state[rows, eos_index.to(last_hidden_state.device)]
    proj = text_encoder_2.text_projection
    return proj(pooled.to(proj.weight.dtype)).to(last_hidden_state.dtype)


def encode_sdxl_text(text_encoder: nn.Module, text_encoder_2: nn.Module, input_ids: torch.Tensor,
                     input_ids_2: torch.Tensor, eos_id: int) -> TextConditioning:
    """Both encoders over (B, n*77) ids, each 77-token chunk encoded on its own and the chunks
    concatenated (as for SD1.5); the pooled output is the first chunk's (kohya
    `get_hidden_states_sdxl`: `pool2[::n_size]`; the WebUI uses the first chunk's too)."""
    b = input_ids.shape[0]
    ids1 = input_ids.reshape(-1, SDXL.chunk_length)
    ids2 = input_ids_2.reshape(-1, SDXL.chunk_length)
    spec1, spec2 = SDXL.text_encoders  # hidden states as they are: neither goes through the final norm
    h1 = text_encoder(ids1, output_hidden_states=True, return_dict=True).hidden_states[-spec1.layer_from_end]
    out2 = text_encoder_2(ids2, output_hidden_states=True, return_dict=True)
    h2 = out2.hidden_states[-spec2.layer_from_end]
    pooled = pooled_output(text_encoder_2, out2.last_hidden_state, ids2, eos_id)
    cond = torch.cat([h1.reshape(b, -1, h1.shape[-1]), h2.reshape(b, -1, h2.shape[-1])], dim=-1)
    return TextConditioning(cond, pooled.reshape(b, -1, pooled.shape[-1])[:, 0])


# --------------------------------------------------------------------------------------------
# Size and crop conditioning


def kohya_crop_ltrb(bucket_wh: Sequence[int], image_wh: Sequence[int]) -> tuple[float, float, float, float]:
    """kohya's crop box for an image in a bucket (sd-scripts library/train_util.py
    `BucketManager.get_crop_ltrb`, used by `trim_and_resize_if_required` and the latent cache):
    the image scaled to fit the bucket by its longer relative side, centred; floats as there."""
    bucket_ar = bucket_wh[0] / bucket_wh[1]
    image_ar = image_wh[0] / image_wh[1]
    if bucket_ar > image_ar:
        resized_w, resized_h = bucket_wh[1] * image_ar, bucket_wh[1]
    else:
        resized_w, resized_h = bucket_wh[0], bucket_wh[0] / image_ar
    left = (bucket_wh[0] - resized_w) // 2
    top = (bucket_wh[1] - resized_h) // 2
    return left, top, left + resized_w, top + resized_h


def size_conditioning(image_wh: Sequence[int], bucket_wh: Sequence[int],
                      flipped: bool = False) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(original size (h, w), crop top-left (top, left), target size (h, w)) of one sample, as
    kohya's dataset gives them for a bucketed image (sd-scripts library/train_util.py
    `BaseDataset.__getitem__`): the original size is the image's before resizing, the target
    size the bucket's, and a flipped sample's left is measured from the right of its crop box."""
    left, top, right, _ = kohya_crop_ltrb(bucket_wh, image_wh)
    if flipped:
        left = bucket_wh[0] - right
    return (
        (int(image_wh[1]), int(image_wh[0])),
        (int(top), int(left)),
        (int(bucket_wh[1]), int(bucket_wh[0])),
    )


def time_ids(original_hw: Sequence[int], crop_top_left: Sequence[int], target_hw: Sequence[int]) -> torch.Tensor:
    """The six time ids of one sample, in the order the SDXL U-Net embeds them (diffusers'
    `add_time_ids`; kohya sdxl_train_util `get_size_embeddings` concatenates the same three)."""
    return torch.tensor([*original_hw, *crop_top_left, *target_hw], dtype=torch.float32)


def bucket_time_ids(image_sizes_wh: Sequence[Sequence[int]], bucket_wh: Sequence[int],
                    flipped: Sequence[bool] | None = None) -> torch.Tensor:
    """(B, 6) time ids for a batch of images from one bucket."""
    flips = list(flipped) if flipped is not None else [False] * len(image_sizes_wh)
    return torch.stack([time_ids(*size_conditioning(wh, bucket_wh, f)) for wh, f in zip(image_sizes_wh, flips, strict=True)])


def added_conditions(pooled: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The U-Net's `added_cond_kwargs`: pooled text embedding and time ids, one row per sample."""
    return {"text_embeds": pooled, "time_ids": ids.to(pooled.device)}


# --------------------------------------------------------------------------------------------


class SDXLBackbone(DiffusersBackbone):
    """The standalone SDXL Backbone: U-Net, two text encoders and tokenizers, VAE, frozen."""

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                 model_name: str = "", model_path=None):
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, model_name, model_path, family=SDXL)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        text_encoder_2.requires_grad_(False)
        text_encoder_2.eval()

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> SDXLBackbone:
        super().to(device, dtype)
        self.text_encoder_2.to(self.device, self.dtype)
        # SDXL's VAE overflows in fp16 (diffusers' `force_upcast` in its config): it stays fp32.
        self.vae.to(self.device, torch.float32)
        return self

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, enabled=False):  # fp32 also under a caller's autocast
            return super().encode_images(pixels.float())

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, enabled=False):
            return super().decode_latents(latents.float())

    def encode_text(self, input_ids: torch.Tensor, clip_skip: int = 1,
                    input_ids_2: torch.Tensor | None = None) -> TextConditioning:
        """Token ids (B, n*77) -> (context (B, n*77, 2048 for SDXL), pooled (B, 1280)).

        `input_ids_2`: the second tokenizer's ids; derived from `input_ids` when not given.
        SDXL always uses the penultimate layers (kohya ignores clip_skip for SDXL too); the
        argument is accepted so SD1.5 and SDXL callers look alike."""
        del clip_skip
        ids = input_ids.to(self.device)
        if input_ids_2 is None:
            input_ids_2 = te2_input_ids(ids, self.tokenizer.eos_token_id, self.tokenizer_2.pad_token_id)
        return encode_sdxl_text(self.text_encoder, self.text_encoder_2, ids, input_ids_2.to(self.device),
                                self.tokenizer_2.eos_token_id)

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
                      added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if added is None:
            raise ValueError("the SDXL U-Net needs its added conditioning (pooled text embedding and time ids)")
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=cond, added_cond_kwargs=added,
                         return_dict=False)[0]

    def lora_targets(self, conv: bool = False) -> list:
        """U-Net targets under sgm-path kohya names, then TE1 (`lora_te1_`) and TE2 (`lora_te2_`)."""
        from lib_lora.training.naming import family_targets

        return family_targets(self.family, self.unet, (self.text_encoder, self.text_encoder_2), conv)
