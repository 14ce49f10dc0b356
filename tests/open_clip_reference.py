"""open_clip's text transformer, module for module, for tests that need its layout while open_clip
itself cannot be imported (it needs torchvision)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


class OpenClipBlock(nn.Module):
    """open_clip.transformer.ResidualAttentionBlock (pre-norm, nn.MultiheadAttention, GELU MLP,
    no layer scale): its names and forward."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, attn_mask):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(OpenClipBlock(width, heads) for _ in range(layers))
