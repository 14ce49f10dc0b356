"""Mirrors backend/nn/unet.py: IntegratedUNet2DConditionModel. Forge's file is ComfyUI's port of
ldm's openaimodel: the same module tree under the same names (input_blocks, middle_block,
output_blocks; SpatialTransformer, BasicTransformerBlock, CrossAttention, ResBlock...), so the
stand-in is ldm's UNetModel with Forge's forward signature."""
from ldm.modules.diffusionmodules.openaimodel import UNetModel


class IntegratedUNet2DConditionModel(UNetModel):
    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006 - Forge's
        transformer_options["original_shape"] = list(x.shape)  # Forge writes into this dict
        return super().forward(x, timesteps=timesteps, context=context, y=y)
