"""Mirrors backend/nn/vae.py: IntegratedAutoencoderKL, ldm's encoder/decoder tree with
encode(x, regulation) -> a posterior sample, decode, process_in/process_out (the scale)."""
from torch import nn


class IntegratedAutoencoderKL(nn.Module):
    def __init__(self, ldm_vae, scaling_factor=0.18215, shift_factor=0.0):
        super().__init__()
        # the stand-in takes ldm's AutoencoderKL tree (Forge's Encoder/Decoder are ldm's)
        self.encoder = ldm_vae.encoder
        self.decoder = ldm_vae.decoder
        self.quant_conv = ldm_vae.quant_conv
        self.post_quant_conv = ldm_vae.post_quant_conv
        self.embed_dim = self.post_quant_conv.in_channels
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor

    def encode(self, x, regulation=None):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        z = self.quant_conv(self.encoder(x))
        posterior = DiagonalGaussianDistribution(z)
        return regulation(posterior) if regulation is not None else posterior.sample()

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scaling_factor

    def process_out(self, latent):
        return (latent / self.scaling_factor) + self.shift_factor
