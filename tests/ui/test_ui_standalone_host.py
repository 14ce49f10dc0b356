"""StandaloneHost: the tiny base model, a real kohya LoRA file, test images through diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib_lora.errors import UserError
from lib_lora.hosts.standalone import StandaloneHost, lora_shape, parse_lora_tags


def test_parse_lora_tags() -> None:
    assert parse_lora_tags("a photo of zny, smiling <lora:zny:0.8>") == ("a photo of zny, smiling", [("zny", 0.8)])
    assert parse_lora_tags("<lora:张娜英> portrait") == ("portrait", [("张娜英", 1.0)])
    assert parse_lora_tags("plain prompt") == ("plain prompt", [])


@pytest.fixture(scope="module")
def host_with_lora(tmp_path_factory):
    from lib_lora.training.export import write_lora
    from lib_lora.training.lora import LoRANetwork

    root = tmp_path_factory.mktemp("host")
    host = StandaloneHost(base_model="tiny", output_dir=root / "loras", work_dir=root / "work", device="cpu")
    backbone = host.backbone()
    torch.manual_seed(0)
    net = LoRANetwork(backbone.lora_targets(), dim=4, alpha=2.0)
    with torch.no_grad():  # a LoRA that does something: up weights are zero at init
        for name, p in net.named_parameters():
            if "lora_up" in name:
                p.normal_(0, 0.5)
    write_lora(host.lora_dir() / "probe.safetensors", net.state_dict_kohya(), {"ss_output_name": "probe"})
    return host


def test_lora_shape_reads_dim_and_alpha(host_with_lora) -> None:
    from lib_lora.training.export import read_lora

    tensors, _ = read_lora(host_with_lora.lora_dir() / "probe.safetensors")
    assert lora_shape(tensors) == (4, 2.0, 0, 1.0)


def test_generate_applies_and_removes_lora(host_with_lora) -> None:
    host = host_with_lora
    backbone = host.backbone()
    before = {k: v.clone() for k, v in backbone.unet.state_dict().items()}
    kw = dict(steps=4, width=64, height=64, cfg_scale=5.0)
    base, w0, w1 = host.generate(["a face", "a face <lora:probe:0>", "a face <lora:probe:1>"], seed=7, **kw)
    again = host.generate(["a face"], seed=7, **kw)[0]
    a = [np.asarray(im, dtype=np.int16) for im in (base, w0, w1, again)]
    assert base.size == (64, 64)
    assert np.array_equal(a[0], a[3]), "same seed, no LoRA: same image"
    assert np.abs(a[0] - a[1]).max() <= 1, "weight 0 is the base model"
    assert np.abs(a[0] - a[2]).mean() > 1, "weight 1 changes the image"
    after = backbone.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the LoRA is removed after generating"


def test_generate_unknown_lora_is_a_user_error(host_with_lora) -> None:
    with pytest.raises(UserError, match="No LoRA named 'nope'"):
        host_with_lora.generate(["x <lora:nope:1>"], seed=1, steps=1, width=64, height=64)


def test_generate_with_each_sampler(host_with_lora) -> None:
    """Every listed sampler makes an image (deterministic for a seed); the choice changes the image."""
    host = host_with_lora
    kw = dict(steps=3, width=64, height=64, cfg_scale=5.0)
    images = {}
    for name in host.samplers():
        first, again = (host.generate(["a face"], seed=3, sampler_name=name, **kw)[0] for _ in range(2))
        images[name] = np.asarray(first, dtype=np.int16)
        assert first.size == (64, 64) and np.array_equal(images[name], np.asarray(again, dtype=np.int16)), name
    assert np.abs(images["DPM++ 2M Karras"] - images["Euler a"]).mean() > 0.5
    with pytest.raises(UserError, match="Unknown sampler 'nope'.*DPM\\+\\+ 2M Karras"):
        host.generate(["a face"], seed=1, sampler_name="nope", **kw)
