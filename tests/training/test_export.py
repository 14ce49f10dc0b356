"""The exported file is a kohya LoRA: hashes, atomic writes, refusals, and a third-party reader."""

import pytest
import torch
from lora_helpers import merge_diffusers_lora

from lib_lora.errors import UserError
from lib_lora.training.export import addnet_hashes, read_lora, read_metadata, write_lora
from lib_lora.training.lora import LoRANetwork
from lib_lora.training.models import load_backbone


@pytest.fixture
def network(tiny_backbone, randomize):
    torch.manual_seed(0)
    net = LoRANetwork(tiny_backbone.lora_targets(), dim=4, alpha=2)
    randomize(net)
    return net


def test_hashes_are_recomputable_and_write_is_atomic(tmp_path, network):
    path = write_lora(tmp_path / "张娜英.safetensors", network.state_dict_kohya(), {"ss_network_dim": "4", "modelspec.title": "x"})
    tensors, meta = read_lora(path)
    assert meta == read_metadata(path)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == addnet_hashes(tensors, meta)
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"].shape == ()
    assert [p.name for p in tmp_path.iterdir()] == ["张娜英.safetensors"]  # no temp file left


def test_existing_file_is_never_overwritten_unless_asked(tmp_path, network):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"user's file")
    with pytest.raises(UserError, match="already exists"):
        write_lora(path, network.state_dict_kohya(), {})
    assert path.read_bytes() == b"user's file"
    write_lora(path, network.state_dict_kohya(), {}, overwrite=True)
    assert read_lora(path)[0]


def test_non_finite_weights_are_never_exported(tmp_path, network):
    sd = network.state_dict_kohya()
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    with pytest.raises(UserError, match="non-finite"):
        write_lora(tmp_path / "bad.safetensors", sd, {})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("conv_dim", [0, 2])
def test_diffusers_reads_our_file_like_a_kohya_lora(tmp_path, tiny_backbone, randomize, conv_dim):
    """Read the file with diffusers' own non-diffusers (kohya) LoRA conversion and compare outputs."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    network = LoRANetwork(tiny_backbone.lora_targets(conv=bool(conv_dim)), dim=4, alpha=2, conv_dim=conv_dim, conv_alpha=1)
    randomize(network)
    path = write_lora(tmp_path / "lora.safetensors", network.state_dict_kohya(), {}, dtype=torch.float32)
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path), weight_name=path.name)
    assert len(state_dict) == 2 * len(network.loras)  # every module was recognised
    fresh = load_backbone("tiny")
    assert merge_diffusers_lora({"unet": fresh.unet, "text_encoder": fresh.text_encoder}, state_dict, alphas) == len(network.loras)

    gen = torch.Generator().manual_seed(3)
    ids = tiny_backbone.tokenizer(["zhangnaying, 1girl, smile"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    lat = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        base_cond = tiny_backbone.encode_text(ids)
        base_eps = tiny_backbone.predict_noise(lat, t, base_cond.expand(2, -1, -1))
        network.apply()
        try:
            ours_cond = tiny_backbone.encode_text(ids)
            ours_eps = tiny_backbone.predict_noise(lat, t, ours_cond.expand(2, -1, -1))
        finally:
            network.remove()
        theirs_cond = fresh.encode_text(ids)
        theirs_eps = fresh.predict_noise(lat, t, theirs_cond.expand(2, -1, -1))

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(ours_cond, base_cond) > 1e-2 and rel(ours_eps, base_eps) > 1e-2  # the LoRA does something
    assert rel(theirs_cond, ours_cond) <= 1e-3
    assert rel(theirs_eps, ours_eps) <= 1e-3
