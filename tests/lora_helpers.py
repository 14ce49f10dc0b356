"""Helpers the LoRA tests share: non-zero up weights, and merging a LoRA as diffusers names it."""

from __future__ import annotations

import torch
from torch import nn

_TE_ATTN = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


def randomize_lora(network, seed: int = 0, scale: float = 0.05) -> None:
    """Give every LoRA non-zero up weights, so its effect on the outputs is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras.values():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=gen) * scale)


def merge_diffusers_lora(roots: dict[str, nn.Module], state_dict: dict[str, torch.Tensor],
                         alphas: dict[str, float]) -> int:
    """Merge a LoRA, as diffusers' converter names it, into the weights: W += up @ down * alpha / rank.

    `roots`: the model part each key's first component names ("unet", "text_encoder",
    "text_encoder_2"). diffusers 0.31 needs its PEFT backend (transformers > 4.33) to *apply*
    a LoRA, and the WebUI pins transformers 4.30.2, so we apply the standard merge ourselves;
    the reading of the kohya file, the key conversion and the alphas are diffusers' own.
    A key naming no module raises (get_submodule). Returns how many modules were merged.
    """
    merged = 0
    for key, down in state_dict.items():
        if not key.endswith("down.weight"):
            continue
        up = state_dict[key.replace("down.weight", "up.weight")]
        alpha = alphas.get(key + ".alpha", alphas.get(key.replace(".lora.down.weight", ".alpha")))
        assert alpha is not None, f"diffusers found no alpha for {key}"
        part, rest = key.split(".", 1)
        if part == "unet":
            path = rest.replace(".lora.down.weight", "")
            for proj in ("q", "k", "v"):  # attention-processor style names
                path = path.replace(f".processor.to_{proj}_lora.down.weight", f".to_{proj}")
            path = path.replace(".processor.to_out_lora.down.weight", ".to_out.0")
        else:
            path = rest.replace(".lora_linear_layer.down.weight", "")
            for old, new in _TE_ATTN.items():
                path = path.replace(f"{old}.down.weight", new)
        module = roots[part].get_submodule(path)
        delta = (up.flatten(1).float() @ down.flatten(1).float()).reshape(module.weight.shape)
        with torch.no_grad():
            module.weight += delta * (alpha / down.shape[0])
        merged += 1
    return merged
