"""A stand-in for the few `sgm` (Stability-AI generative-models) classes an A1111 SDXL model is
made of, as `shared.sd_model` holds it: no registry package ships `sgm`.

Module names, class names and forward signatures follow generative-models 0ad7de9 (checked by
tests/webui/test_webui_sgm_facts.py against sgm_facts.json); the U-Net is assembled from the
real ldm building blocks (ResBlock, SpatialTransformer, Downsample, Upsample), whose state-dict
layout sgm kept, in sgm's `UNetModel.__init__` order, so the tiny-sdxl single file loads strictly.
"""

from __future__ import annotations

import torch
from torch import nn

from lib_lora.training.tiny_model import TINY_SDXL_TE2_HIDDEN, TINY_SDXL_TIME_DIM


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """sgm.modules.diffusionmodules.util.timestep_embedding (cos first, then sin)."""
    import math

    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _spatial_transformer_class():
    from ldm.modules.attention import SpatialTransformer as LdmSpatialTransformer

    class SpatialTransformer(LdmSpatialTransformer):
        """sgm.modules.attention.SpatialTransformer: ldm's layout, and sgm's forward, which
        gives one context to every block (ldm's wants one per block)."""

        def forward(self, x, context=None):
            if not isinstance(context, list):
                context = [context]
            b, c, h, w = x.shape
            x_in = x
            x = self.norm(x)
            x = self.proj_in(x.reshape(b, c, h * w).transpose(1, 2).contiguous())
            for i, block in enumerate(self.transformer_blocks):
                x = block(x, context=context[0 if len(context) == 1 else i])
            x = self.proj_out(x)
            return x.transpose(1, 2).reshape(b, -1, h, w).contiguous() + x_in

    return SpatialTransformer


class UNetModel(nn.Module):
    """sgm.modules.diffusionmodules.openaimodel.UNetModel (SDXL's arguments: num_classes
    "sequential", per-level transformer_depth, use_linear_in_transformer, num_head_channels)."""

    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 channel_mult, num_head_channels, transformer_depth, context_dim, adm_in_channels):
        super().__init__()
        from ldm.modules.diffusionmodules.openaimodel import (
            Downsample,
            ResBlock,
            TimestepEmbedSequential,
            Upsample,
        )
        from ldm.modules.diffusionmodules.util import conv_nd, linear, normalization, zero_module

        SpatialTransformer = _spatial_transformer_class()  # noqa: N806 (sgm's class name)
        self.model_channels = model_channels
        self.num_classes = "sequential"
        ted = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, ted), nn.SiLU(), linear(ted, ted))
        self.label_emb = nn.Sequential(nn.Sequential(linear(adm_in_channels, ted), nn.SiLU(), linear(ted, ted)))

        def attn(ch, depth):
            return SpatialTransformer(ch, ch // num_head_channels, num_head_channels, depth=depth,
                                      context_dim=[context_dim] * depth,  # ldm's takes one per block
                                      use_linear=True, use_checkpoint=False)

        def res(ch, out, **kw):
            return ResBlock(ch, ted, 0.0, out_channels=out, dims=2, use_checkpoint=False, **kw)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(2, in_channels, model_channels, 3, padding=1))])
        chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attn(ch, transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, True, dims=2, out_channels=ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, transformer_depth[-1]), res(ch, ch))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch, transformer_depth[level]))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, True, dims=2, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(conv_nd(2, model_channels, out_channels, 3, padding=1)))

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        emb = emb + self.label_emb(y)
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


# tiny-sdxl in sgm's arguments (lib_lora.training.tiny_model.TINY_SDXL_UNET in diffusers' terms)
TINY_SGM_UNET_KWARGS = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2,
                            attention_resolutions=[2, 4], channel_mult=[1, 2, 2], num_head_channels=64,
                            transformer_depth=[1, 2, 2], context_dim=64 + TINY_SDXL_TE2_HIDDEN,
                            adm_in_channels=TINY_SDXL_TE2_HIDDEN + 6 * TINY_SDXL_TIME_DIM)


class OpenAIWrapper(nn.Module):
    """sgm.modules.diffusionmodules.wrappers.OpenAIWrapper: holds `diffusion_model`."""

    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c, **kwargs):
        x = torch.cat((x, c.get("concat", torch.Tensor([]).type_as(x))), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn", None), y=c.get("vector", None), **kwargs)


class FrozenCLIPEmbedder(nn.Module):
    """sgm.modules.encoders.modules.FrozenCLIPEmbedder as SDXL's config makes it (layer "hidden", layer_idx 11)."""

    def __init__(self, transformer, tokenizer, layer="hidden", layer_idx=11):
        super().__init__()
        self.transformer, self.tokenizer = transformer, tokenizer
        self.layer, self.layer_idx, self.return_pooled, self.max_length = layer, layer_idx, False, 77
        self.input_key, self.legacy_ucg_val, self.ucg_rate = "txt", None, 0.0

    def forward(self, text):
        raise AssertionError("training must tokenize captions itself, not call the embedder on texts")


class ResidualAttentionBlock(nn.Module):
    """open_clip.transformer.ResidualAttentionBlock (ln_1, attn, ln_2, mlp.c_fc / gelu / c_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))

    def forward(self, x, attn_mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])


class OpenCLIPTextTower(nn.Module):
    """The text half of open_clip.model.CLIP (`del model.visual`), sequence-first (batch_first False)."""

    def __init__(self, width: int, layers: int, heads: int, vocab: int = 49408, ctx: int = 77):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.empty(ctx, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, width))
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.register_buffer("attn_mask", torch.full((ctx, ctx), float("-inf")).triu_(1), persistent=False)


class FrozenOpenCLIPEmbedder2(nn.Module):
    """sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2 as SDXL's config makes it (layer
    "penultimate", always_return_pooled, legacy False); encode_with_transformer, pool and
    text_transformer_forward are sgm's bodies."""

    def __init__(self, model: nn.Module, layer="penultimate", always_return_pooled=True, legacy=False):
        super().__init__()
        self.model = model
        self.layer, self.layer_idx = layer, 1 if layer == "penultimate" else 0
        self.return_pooled, self.legacy, self.max_length = always_return_pooled, legacy, 77
        self.input_key, self.legacy_ucg_val, self.ucg_rate = "txt", None, 0.0

    def forward(self, text):
        raise AssertionError("training must tokenize captions itself, not call the embedder on texts")

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text)
        x = x + self.model.positional_embedding
        x = x.permute(1, 0, 2)
        x = self.text_transformer_forward(x, attn_mask=self.model.attn_mask)
        if self.legacy:
            return self.model.ln_final(x[self.layer])
        o = self.model.ln_final(x["last"])
        x["pooled"] = self.pool(o, text)
        return x

    def pool(self, x, text):
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.model.text_projection

    def text_transformer_forward(self, x, attn_mask=None):
        outputs = {}
        for i, r in enumerate(self.model.transformer.resblocks):
            if i == len(self.model.transformer.resblocks) - 1:
                outputs["penultimate"] = x.permute(1, 0, 2)
            x = r(x, attn_mask=attn_mask)
        outputs["last"] = x.permute(1, 0, 2)
        return outputs


class Timestep(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return timestep_embedding(t, self.dim)


class ConcatTimestepEmbedderND(nn.Module):
    """sgm.modules.encoders.modules.ConcatTimestepEmbedderND: each of a (B, d) input's d
    values through a Fourier embedding of `outdim`, concatenated."""

    def __init__(self, outdim: int, input_key: str):
        super().__init__()
        self.timestep = Timestep(outdim)
        self.outdim, self.input_key, self.legacy_ucg_val, self.ucg_rate = outdim, input_key, None, 0.0

    def forward(self, x):
        if x.ndim == 1:
            x = x[:, None]
        b, dims = x.shape
        emb = self.timestep(x.reshape(-1))
        return emb.reshape(b, dims * self.outdim)


class GeneralConditioner(nn.Module):
    """sgm.modules.encoders.modules.GeneralConditioner: `embedders`, outputs concatenated by kind."""

    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, embedders):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)


class DiffusionEngine(nn.Module):
    """sgm.models.diffusion.DiffusionEngine as A1111 holds it (`modules/sd_models_xl.py` adds
    apply_model and get_first_stage_encoding; `extend_sdxl` adds the flags below)."""

    def __init__(self, unet, vae, conditioner, scale_factor: float = 0.13025):
        super().__init__()
        self.model = OpenAIWrapper(unet)
        self.first_stage_model = vae
        self.conditioner = conditioner
        self.scale_factor = scale_factor
        self.is_sdxl, self.is_sd1, self.is_sd2, self.is_sdxl_inpaint = True, False, False, False
        self.lowvram = False
        self.model.conditioning_key = "crossattn"
        self.cond_stage_key = "txt"
        self.parameterization = "eps"

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.scale_factor * self.first_stage_model.encode(x).sample()

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)

    def get_first_stage_encoding(self, x):  # A1111: sgm's encode_first_stage does everything
        return x

    def apply_model(self, x, t, cond):
        return self.model(x, t, cond)

    def get_learned_conditioning(self, batch):
        raise AssertionError("training must encode captions itself, not through the prompt parser")


class EmbedderWithCustomWords(nn.Module):
    """What A1111's sd_hijack puts in `conditioner.embedders[0/1]` (sd_hijack_clip's
    FrozenCLIPEmbedderForSDXLWithCustomWords, sd_hijack_open_clip's
    FrozenOpenCLIPEmbedder2WithCustomWords): `.wrapped`, and a forward that parses prompt emphasis."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped
        self.input_key = wrapped.input_key

    def forward(self, texts):
        raise AssertionError("training must tokenize captions itself, not call the hijacked embedder")


def hijack_text_embedders(model: DiffusionEngine) -> None:
    """A1111's sd_hijack on an SDXL model: both text embedders wrapped."""
    for i in (0, 1):
        model.conditioner.embedders[i] = EmbedderWithCustomWords(model.conditioner.embedders[i])
