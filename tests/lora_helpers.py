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


def randomize_lycoris(net, seed: int) -> None:
    """Trained-looking weights in every LyCORIS module (a fresh network adds nothing: its up/w2
    parts are zero). LoHa's weight is a product of two products: larger factors."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in net.loras:
            for name, p in lora.named_parameters():
                noise = torch.randn(p.shape, generator=gen)
                if name == "dora_scale":
                    p.mul_(1 + 0.1 * noise)
                else:
                    p.copy_(noise * (0.5 if name.startswith("hada") else 0.1))


def change_against_merged(ours: nn.Module, layer: nn.Module, merged_weight: torch.Tensor,
                          gen: torch.Generator) -> float:
    """On one random input: how far what `ours` (a layer with its trained module applied) adds to
    `layer`'s output is from what a loader's merged weight adds, relative to the latter.

    Asserts the merged weight changes the output visibly (a file that adds nothing would agree
    with anything). `layer` is the host's module holding the same weight as `ours`."""
    if isinstance(ours, nn.Conv2d):
        x = torch.randn(2, ours.in_channels, 8, 8, generator=gen)

        def op(w: torch.Tensor) -> torch.Tensor:
            return nn.functional.conv2d(x, w, layer.bias, layer.stride, layer.padding)
    else:
        x = torch.randn(3, ours.in_features, generator=gen)

        def op(w: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, w, layer.bias)
    with torch.no_grad():
        base = op(layer.weight)
        theirs, trained = op(merged_weight) - base, ours(x) - base
    assert theirs.norm() > 1e-3 * base.norm()
    return float((trained - theirs).norm() / theirs.norm())
