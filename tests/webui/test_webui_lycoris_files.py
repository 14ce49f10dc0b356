"""LyCORIS files (LoCon, LoHa, LoKr, DoRA) as the WebUI v1.10's Lora extension loads them.

The WebUI side is re-written here from its source: AUTOMATIC1111/stable-diffusion-webui v1.10.1,
commit 82a973c04367123ae98bd9abdf80d9eda9b910e2, extensions-builtin/Lora/networks.py
(`assign_network_names_to_compvis_modules`, `convert_diffusers_name_to_compvis`, the key loop of
`load_network`), network.py (`NetworkModule.calc_scale`, `finalize_updown`,
`apply_weight_decompose`), network_lora.py, network_hada.py, network_lokr.py and lyco_helpers.py.
It runs on the WebUI-shaped ldm model (tests/webui/conftest.py), against a file our network wrote.
"""

from __future__ import annotations

import re

import pytest
import torch
from lora_helpers import change_against_merged, randomize_lycoris
from torch import nn

from lib_lora.hosts.ldm_backbone import LdmBackbone
from lib_lora.training.export import read_lora, write_lora
from lib_lora.training.lycoris_net import LycorisKohyaNetwork
from lib_lora.training.models import load_backbone

pytest.importorskip("lycoris")

TYPES = ["locon", "loha", "lokr", "dora"]


# ---- networks.py: names ------------------------------------------------------------------------

def webui_layer_mapping(sd_model: nn.Module) -> dict[str, nn.Module]:
    """assign_network_names_to_compvis_modules, SD1 branch."""
    mapping = {}
    cond = getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model)
    for name, module in cond.named_modules():
        mapping[name.replace(".", "_")] = module
    for name, module in sd_model.model.named_modules():
        mapping[name.replace(".", "_")] = module
    return mapping


SUFFIX_CONVERSION = {
    "attentions": {},
    "resnets": {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"},
}
RE_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def convert_diffusers_name_to_compvis(key: str) -> str:
    """networks.convert_diffusers_name_to_compvis with is_sd2 False."""
    m: list = []

    def match(regex_text: str) -> bool:
        r = re.match(regex_text, key)
        if not r:
            return False
        m.clear()
        m.extend([int(x) if re.match(r"\d+", x) else x for x in r.groups()])
        return True

    if match(r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if match(r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{m[0]}"
    if match(r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = SUFFIX_CONVERSION.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    return key


def webui_match(sd: dict[str, torch.Tensor], mapping: dict[str, nn.Module]):
    """The key loop of networks.load_network (no diffusers_weight_map): matched modules with
    their weights by network part, and the keys that failed to match."""
    matched: dict[str, tuple[nn.Module, dict]] = {}
    failed = {}
    for key_network, weight in sd.items():
        base, _, part = key_network.partition(".")
        key = convert_diffusers_name_to_compvis(base)
        module = mapping.get(key)
        if module is None:
            mx = RE_X_PROJ.match(key)
            if mx:
                module = mapping.get(mx.group(1))
        if module is None and "lora_unet" in base:
            key = base.replace("lora_unet", "diffusion_model")
            module = mapping.get(key)
        elif module is None and "lora_te1_text_model" in base:
            key = base.replace("lora_te1_text_model", "0_transformer_text_model")
            module = mapping.get(key)
            if module is None:
                key = base.replace("lora_te1_text_model", "transformer_text_model")
                module = mapping.get(key)
        if module is None:
            failed[key_network] = key
            continue
        matched.setdefault(key, (module, {}))[1][part] = weight
    return matched, failed


# ---- network*.py and lyco_helpers.py: the weight each module adds ---------------------------

def rebuild_conventional(up, down, shape):
    up = up.reshape(up.size(0), -1)
    down = down.reshape(down.size(0), -1)
    return (up @ down).reshape(shape)


def make_kron(orig_shape, w1, w2):
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    w2 = w2.contiguous()
    return torch.kron(w1, w2).reshape(orig_shape)


def module_type(w: dict) -> str:
    """The first of module_types (networks.py: Lora, Hada, IA3, Lokr, ...) whose create_module accepts the keys."""
    if all(x in w for x in ["lora_up.weight", "lora_down.weight"]):
        return "lora"
    if all(x in w for x in ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]):
        return "hada"
    has_1 = "lokr_w1" in w or ("lokr_w1_a" in w and "lokr_w1_b" in w)
    has_2 = "lokr_w2" in w or ("lokr_w2_a" in w and "lokr_w2_b" in w)
    if has_1 and has_2:
        return "lokr"
    raise AssertionError(f"no module type accepts {sorted(w)}")


def webui_updown(sd_module: nn.Module, w: dict) -> torch.Tensor:
    """calc_updown of the module type, then NetworkModule.finalize_updown (multipliers 1)."""
    orig_weight = sd_module.weight.detach()
    shape = sd_module.weight.shape
    alpha = w["alpha"].item() if "alpha" in w else None
    dim = None
    kind = module_type(w)
    if kind == "lora":
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        dim = down.shape[0]
        output_shape = [up.size(0), down.size(1)]
        if len(down.shape) == 4:
            output_shape += down.shape[2:]
        updown = rebuild_conventional(up, down, output_shape)
    elif kind == "hada":
        w1a, w1b, w2a, w2b = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
        dim = w1b.shape[0]
        output_shape = [w1a.size(0), w1b.size(1)]
        if len(w1b.shape) == 4:
            output_shape += w1b.shape[2:]
        updown = rebuild_conventional(w1a, w1b, output_shape) * rebuild_conventional(w2a, w2b, output_shape)
    else:
        w1 = w.get("lokr_w1")
        if w1 is None:
            w1 = w["lokr_w1_a"] @ w["lokr_w1_b"]
            dim = w["lokr_w1_b"].shape[0]
        w2 = w.get("lokr_w2")
        if w2 is None:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
            dim = w["lokr_w2_b"].shape[0]
        output_shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if len(orig_weight.shape) == 4:
            output_shape = orig_weight.shape
        updown = make_kron(output_shape, w1, w2)
    # finalize_updown
    if len(output_shape) == 4:
        updown = updown.reshape(output_shape)
    if orig_weight.size().numel() == updown.size().numel():
        updown = updown.reshape(orig_weight.shape)
    scale = alpha / dim if dim is not None and alpha is not None else 1.0
    updown = updown * scale
    if "dora_scale" in w:  # apply_weight_decompose
        dora_scale = w["dora_scale"].to(dtype=updown.dtype)
        merged = updown + orig_weight.to(updown.dtype)
        norm_dims = len(shape) - 1
        merged_norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
                       .reshape(merged.shape[1], *[1] * norm_dims).transpose(0, 1))
        updown = merged * (dora_scale / merged_norm) - orig_weight
    return updown


# ---- the tests -----------------------------------------------------------------------------------

def _written(net: LycorisKohyaNetwork, tmp_path, kind: str) -> dict[str, torch.Tensor]:
    path = write_lora(tmp_path / f"{kind}.safetensors", net.state_dict_kohya(), {"ss_network_module": "lycoris.kohya"},
                      overwrite=True, dtype=torch.float32)
    return read_lora(path)[0]


@pytest.fixture(scope="module")
def diffusers_backbone():
    return load_backbone("tiny")


@pytest.mark.parametrize("kind", TYPES)
def test_webui_matches_every_key_and_its_math_gives_our_outputs(kind, webui_model, diffusers_backbone, tmp_path):
    targets = diffusers_backbone.lora_targets(conv=True)
    torch.manual_seed(0)
    net = LycorisKohyaNetwork(targets, kind, dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0, factor=-1)
    randomize_lycoris(net, seed=1)
    sd = _written(net, tmp_path, kind)

    matched, failed = webui_match(sd, webui_layer_mapping(webui_model))
    assert not failed, list(failed)[:5]
    assert len(matched) == len(targets)  # one WebUI module per network module: 192 + 72 + the convs
    expected = {"locon": "lora", "dora": "lora", "loha": "hada", "lokr": "lokr"}[kind]
    assert {module_type(w) for _, w in matched.values()} == {expected}
    if kind == "dora":
        assert all("dora_scale" in w for _, w in matched.values())

    # Our in-training output of every module against the WebUI's merged weight on the same input.
    ours_by_name = {t.name: t.module for t in targets}
    gen = torch.Generator().manual_seed(2)
    net.eval()
    net.apply()
    try:
        for name in net.names():
            ldm_module, w = matched[convert_diffusers_name_to_compvis(name)]
            ours = ours_by_name[name]
            assert torch.equal(ldm_module.weight, ours.weight), name  # the same layer
            rel = change_against_merged(ours, ldm_module, ldm_module.weight + webui_updown(ldm_module, w), gen)
            assert rel <= 1e-3, (name, rel)
    finally:
        net.remove()


@pytest.mark.parametrize("kind", TYPES)
def test_in_place_on_the_webui_model_leaves_it_exact(kind, webui_model, state_hash):
    bb = LdmBackbone(webui_model)
    before = state_hash(webui_model)
    targets = bb.lora_targets(conv=True)
    torch.manual_seed(0)
    net = LycorisKohyaNetwork(targets, kind, dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0)
    randomize_lycoris(net, seed=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    cond = torch.randn(1, 77, 64, generator=gen)
    t = torch.tensor([500])
    with torch.no_grad():
        plain = bb.predict_noise(x, t, cond)
        net.apply()
        try:
            with_net = bb.predict_noise(x, t, cond)
        finally:
            net.remove()
        again = bb.predict_noise(x, t, cond)
    assert not torch.allclose(plain, with_net)
    assert torch.equal(plain, again)
    assert state_hash(webui_model) == before
    for t_ in targets:  # no attribute of ours or LyCORIS's left on the host's modules
        left = [k for k in vars(t_.module) if k == "forward" or k.startswith("_lycoris")]
        assert not left, (t_.name, left)
