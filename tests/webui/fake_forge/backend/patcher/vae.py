"""Mirrors backend/patcher/vae.py: VAE.encode takes NHWC pixels in [0, 1] and VAE.decode returns
them, each first loading its patcher through the memory manager."""
import torch

from backend import memory_management
from backend.patcher.base import ModelPatcher


class VAE:
    def __init__(self, model=None, device=None, dtype=None, no_init=False):
        if no_init:
            return
        self.first_stage_model = model.eval()
        self.device = memory_management.get_torch_device() if device is None else device
        self.vae_dtype = torch.float32 if dtype is None else dtype
        self.first_stage_model.to(self.vae_dtype)
        self.output_device = memory_management.cpu
        self.patcher = ModelPatcher(self.first_stage_model, load_device=self.device,
                                    offload_device=memory_management.cpu)

    def clone(self):
        n = VAE(no_init=True)
        n.patcher = self.patcher.clone()
        n.first_stage_model = self.first_stage_model
        n.device, n.vae_dtype, n.output_device = self.device, self.vae_dtype, self.output_device
        return n

    def decode_inner(self, samples_in):
        memory_management.load_models_gpu([self.patcher])
        samples = samples_in.to(self.vae_dtype).to(self.device)
        out = torch.clamp((self.first_stage_model.decode(samples).to(self.output_device).float() + 1.0) / 2.0, 0.0, 1.0)
        return out.movedim(1, -1)

    def decode(self, samples_in):
        return self.decode_inner(samples_in)

    def encode_inner(self, pixel_samples):
        pixel_samples = pixel_samples.movedim(-1, 1)
        memory_management.load_models_gpu([self.patcher])
        pixels_in = (2.0 * pixel_samples - 1.0).to(self.vae_dtype).to(self.device)
        return self.first_stage_model.encode(pixels_in, None).to(self.output_device).float()

    def encode(self, pixel_samples):
        return self.encode_inner(pixel_samples)
