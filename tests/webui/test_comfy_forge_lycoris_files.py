"""LyCORIS files (LoCon, LoHa, LoKr, DoRA) as ComfyUI and Forge load them (SD1.5).

Their key mapping, per-name reading and weight math are re-written in tests/comfy_helpers.py from
their public source (files and commits there). The model's keys are those ComfyUI and Forge see:
the single file's `diffusion_model.*` (ldm layout) and `clip_l.transformer.*` (the HF text encoder,
Forge's IntegratedCLIP). Every key of our file must be read (0 "lora key not loaded" in ComfyUI,
0 `lora_unmatch` in Forge), and the patched weight they compute must give our in-training output.
"""

from __future__ import annotations

import pytest
import torch
from comfy_helpers import (
    calculate_weight,
    comfy_load,
    forge_load,
    model_lora_keys_clip,
    model_lora_keys_unet,
    unet_config_from_keys,
)
from lora_helpers import change_against_merged, randomize_lycoris

from lib_lora.training.export import read_lora, write_lora
from lib_lora.training.lycoris_net import LycorisKohyaNetwork
from lib_lora.training.models import load_backbone, read_state_dict

pytest.importorskip("lycoris")

TYPES = ["locon", "loha", "lokr", "dora"]
PATCH_TYPE = {"locon": "lora", "dora": "lora", "loha": "loha", "lokr": "lokr"}


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny")


@pytest.fixture(scope="module")
def model_keys(backbone):
    """(U-Net keys, U-Net config, text-encoder keys, key -> tensor) as ComfyUI/Forge name the tiny model."""
    from lib_lora.training.tiny_model import ensure_tiny_checkpoint

    sd = read_state_dict(ensure_tiny_checkpoint())
    unet = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    # comfy/supported_models.py SD15: cond_stage_model.transformer. -> clip_l.transformer.
    clip = {"clip_l." + k[len("cond_stage_model."):]: v for k, v in sd.items() if k.startswith("cond_stage_model.")}
    return set(unet), unet_config_from_keys(unet), set(clip), {**unet, **clip}


@pytest.fixture(scope="module", params=TYPES)
def lyco_file(request, backbone, tmp_path_factory):
    kind = request.param
    targets = backbone.lora_targets(conv=True)
    torch.manual_seed(0)
    net = LycorisKohyaNetwork(targets, kind, dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0, factor=-1)
    randomize_lycoris(net, seed=1)
    path = write_lora(tmp_path_factory.mktemp(kind) / f"{kind}.safetensors", net.state_dict_kohya(),
                      {"ss_network_module": "lycoris.kohya"}, dtype=torch.float32)
    return kind, net, targets, read_lora(path)[0]


@pytest.mark.parametrize("loader, newest", [(comfy_load, False), (comfy_load, True), (forge_load, False)],
                         ids=["comfyui", "comfyui-839df9f", "forge"])
def test_every_key_is_read_and_the_patched_weights_give_our_outputs(loader, newest, lyco_file, model_keys):
    kind, net, targets, sd = lyco_file
    unet_keys, unet_config, clip_keys, tensors = model_keys
    patches, unread = loader(sd, unet_keys, unet_config, clip_keys)
    assert list(unread) == []
    assert len(patches) == len(targets)  # one patched weight per module of ours
    assert {p[0] for p in patches.values()} == {PATCH_TYPE[kind]}
    if kind == "dora":
        assert all(p[1][4] is not None for p in patches.values())  # dora_scale read into the patch
    if kind == "lokr":  # both kinds of LoKr module are in the file: whole factors, and a decomposed w2
        whole = {t.name for t in targets if f"{t.name}.lokr_w2" in sd}
        assert whole and len(whole) < len(targets) and all(f"{n}.lokr_w1" in sd for n in whole)

    key_map = model_lora_keys_clip(clip_keys, model_lora_keys_unet(unet_keys, unet_config))
    gen = torch.Generator().manual_seed(2)
    net.eval()
    net.apply()
    try:
        for t in targets:
            key = key_map[t.name]
            assert torch.equal(tensors[key], t.module.weight), (t.name, key)  # mapped onto the very layer
            # fp32 merge vs. LyCORIS's own forward: rounding ~1e-6 relative per layer
            rel = change_against_merged(t.module, t.module, calculate_weight(patches[key], tensors[key], whole_lokr_rank=newest), gen)
            assert rel <= 1e-3, (t.name, rel)
    finally:
        net.remove()
