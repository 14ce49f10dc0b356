"""Mirrors backend/diffusion_engine/sdxl.py: StableDiffusionXL builds CLIP({'clip_l': ..., 'clip_g': ...})
with both tokenizers, VAE and the UnetPatcher, its `embedder` (Timestep(256): the Fourier features
of the six size/crop values Forge's get_learned_conditioning puts after the pooled output in
`vector`), and its encode_first_stage / decode_first_stage (inference mode, Forge's VAE). The text
processing engines (prompt parsing, which training never uses) are left out."""
import torch

from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects
from backend.nn.unet import Timestep
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher
from backend.patcher.vae import VAE


class StableDiffusionXL(ForgeDiffusionEngine):
    def __init__(self, estimated_config, huggingface_components):
        super().__init__(estimated_config, huggingface_components)
        clip = CLIP(model_dict={"clip_l": huggingface_components["text_encoder"],
                                "clip_g": huggingface_components["text_encoder_2"]},
                    tokenizer_dict={"clip_l": huggingface_components["tokenizer"],
                                    "clip_g": huggingface_components["tokenizer_2"]})
        vae = VAE(model=huggingface_components["vae"])
        unet = UnetPatcher.from_model(model=huggingface_components["unet"],
                                      diffusers_scheduler=huggingface_components["scheduler"], config=estimated_config)
        self.embedder = Timestep(256)
        self.forge_objects = ForgeObjects(unet=unet, clip=clip, vae=vae, clipvision=None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.is_sdxl = True

    @torch.inference_mode()
    def encode_first_stage(self, x):
        sample = self.forge_objects.vae.encode(x.movedim(1, -1) * 0.5 + 0.5)
        sample = self.forge_objects.vae.first_stage_model.process_in(sample)
        return sample.to(x)

    @torch.inference_mode()
    def decode_first_stage(self, x):
        sample = self.forge_objects.vae.first_stage_model.process_out(x)
        sample = self.forge_objects.vae.decode(sample).movedim(-1, 1) * 2.0 - 1.0
        return sample.to(x)
