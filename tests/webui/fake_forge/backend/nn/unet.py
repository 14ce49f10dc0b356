"""Mirrors backend/nn/unet.py: IntegratedUNet2DConditionModel. Forge's file is ComfyUI's port of
ldm's openaimodel: the same module tree under the same names (input_blocks, middle_block,
output_blocks; SpatialTransformer, BasicTransformerBlock, CrossAttention, ResBlock...), so the
stand-in is ldm's UNetModel with Forge's forward signature, and its BasicTransformerBlocks run
Forge's `_forward`, which adds each attention's output to its input in place (`x += n`)."""
from ldm.modules.attention import BasicTransformerBlock as LdmBasicTransformerBlock
from ldm.modules.diffusionmodules.openaimodel import UNetModel


class BasicTransformerBlock(LdmBasicTransformerBlock):
    def _forward(self, x, context=None):
        # Forge's order of operations (is_res: inner_dim == dim in SD1.5), its in-place adds included
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


class IntegratedUNet2DConditionModel(UNetModel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for m in self.modules():
            if type(m) is LdmBasicTransformerBlock:
                m.__class__ = BasicTransformerBlock

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006 - Forge's
        transformer_options["original_shape"] = list(x.shape)  # Forge writes into this dict
        return super().forward(x, timesteps=timesteps, context=context, y=y)
