"""Mirrors backend/nn/unet.py: IntegratedUNet2DConditionModel and Timestep. Forge's file is
ComfyUI's port of ldm's / sgm's openaimodel: the same module tree under the same names
(input_blocks, middle_block, output_blocks, label_emb for SDXL; SpatialTransformer,
BasicTransformerBlock, CrossAttention, ResBlock...), so the stand-in's U-Net is that tree built
by ldm's UNetModel (SD1.5's arguments) or by the sgm stand-in's UNetModel (SDXL's: they carry
`adm_in_channels`), with Forge's forward signature, and its BasicTransformerBlocks run Forge's
`_forward`, which adds each attention's output to its input in place (`x += n`)."""
import torch
from ldm.modules.attention import BasicTransformerBlock as LdmBasicTransformerBlock
from ldm.modules.diffusionmodules.openaimodel import UNetModel


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    # Forge's (kohya's) sinusoidal embedding: cos first, then sin
    import math

    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(
        device=timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class Timestep(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return timestep_embedding(t, self.dim)


class BasicTransformerBlock(LdmBasicTransformerBlock):
    def _forward(self, x, context=None):
        # Forge's order of operations (is_res: inner_dim == dim in SD1.5 and SDXL), its in-place adds included
        n = self.norm1(x)
        n = self.attn1(n, context=context if self.disable_self_attn else None)
        x += n
        n = self.norm2(x)
        n = self.attn2(n, context=context)
        x += n
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


def _layout(kwargs):
    """The class that builds the tree: ldm's UNetModel for SD1.5, the sgm stand-in's for SDXL."""
    if "adm_in_channels" in kwargs:
        import fake_sgm  # tests/webui/fake_sgm, loaded by the tests' conftest

        return fake_sgm.UNetModel
    return UNetModel


class IntegratedUNet2DConditionModel(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()
        layout = _layout(kwargs)
        tree = layout(*args, **kwargs)
        # the tree's children and plain attributes become this module's (its state dict keys are
        # the tree's own), and its forward is the layout's
        self.__dict__.update({k: v for k, v in vars(tree).items() if not k.startswith("_") and k != "training"})
        for name, child in tree.named_children():
            self.add_module(name, child)
        self._layout_forward = layout.forward
        for m in self.modules():
            if type(m) is LdmBasicTransformerBlock:
                m.__class__ = BasicTransformerBlock

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006 - Forge's
        transformer_options["original_shape"] = list(x.shape)  # Forge writes into this dict
        return self._layout_forward(self, x, timesteps=timesteps, context=context, y=y)
