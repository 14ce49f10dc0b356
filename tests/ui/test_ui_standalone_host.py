"""StandaloneHost: the tiny base model, a real kohya LoRA file, test images through diffusers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lib_lora.errors import UserError
from lib_lora.hosts.standalone import StandaloneHost, lora_shape, parse_lora_tags
from lib_lora.ui import tab_test


def test_parse_lora_tags() -> None:
    assert parse_lora_tags("a photo of zny, smiling <lora:zny:0.8>") == ("a photo of zny, smiling", [("zny", 0.8)])
    assert parse_lora_tags("<lora:张娜英> portrait") == ("portrait", [("张娜英", 1.0)])
    assert parse_lora_tags("plain prompt") == ("plain prompt", [])


def write_random_lora(host: StandaloneHost, name: str, seed: int = 0) -> Path:
    """A kohya LoRA file for the host's model that does something (up weights are zero at init)."""
    from lib_lora.training.export import write_lora
    from lib_lora.training.lora import LoRANetwork

    torch.manual_seed(seed)
    net = LoRANetwork(host.backbone().lora_targets(), dim=4, alpha=2.0)
    with torch.no_grad():
        for param_name, p in net.named_parameters():
            if "lora_up" in param_name:
                p.normal_(0, 0.5)
    return write_lora(host.lora_dir() / f"{name}.safetensors", net.state_dict_kohya(), {"ss_output_name": name},
                      overwrite=True)


@pytest.fixture(scope="module")
def host_with_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("host")
    host = StandaloneHost(base_model="tiny", output_dir=root / "loras", work_dir=root / "work", device="cpu")
    write_random_lora(host, "probe")
    return host


@pytest.fixture()
def lora_reads(path_calls) -> list[str]:
    """The names of the LoRA files read, in order (the real reader runs)."""
    from lib_lora.training import export

    return path_calls(export, "read_lora")


def model_state(backbone) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights of the U-Net and text encoder, and which modules have a forward of their own
    (a LoRA left applied shows there: it wraps forwards and leaves the weights alone)."""
    modules = {"unet": backbone.unet, "te": backbone.text_encoder}
    weights = {f"{k}.{n}": t.detach().clone() for k, m in modules.items() for n, t in m.state_dict().items()}
    patched = [f"{k}.{n}" for k, m in modules.items() for n, mod in m.named_modules() if "forward" in vars(mod)]
    return weights, patched


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


def test_grid_reads_each_lora_once_and_leaves_the_model_as_it_was(host_with_lora, lora_reads) -> None:
    """A prompts x weights grid reads the file once and only changes the weight between cells;
    afterwards the model is bit for bit what it was, and a file changed on disk is read again."""
    host = host_with_lora
    backbone = host.backbone()
    write_random_lora(host, "grid", seed=1)
    kw = dict(steps=2, width=64, height=64, cfg_scale=5.0)
    rows, cells = tab_test.grid_prompts("grid", "{name}, a face\n{name}, a hat", [0, 0.5, 1])
    base = np.asarray(host.generate([rows[0]], seed=7, **kw)[0])
    before = model_state(backbone)
    del lora_reads[:]

    grid = [np.asarray(im) for im in host.generate(cells, seed=7, **kw)]
    assert lora_reads == ["grid.safetensors"], "one read per grid, not one per cell"
    weights, patched = model_state(backbone)
    assert patched == before[1] and weights.keys() == before[0].keys()
    assert all(torch.equal(weights[k], before[0][k]) for k in weights)
    assert np.array_equal(np.asarray(host.generate([rows[0]], seed=7, **kw)[0]), base), "the LoRA is gone"
    # Each cell is what that cell alone makes: the weight really changed from cell to cell.
    for cell, image in zip(cells[:3], grid[:3], strict=True):
        assert np.array_equal(np.asarray(host.generate([cell], seed=7, **kw)[0]), image), cell
    assert len({im.tobytes() for im in grid[:3]}) == 3
    # The same LoRA named twice adds up its weights (one network cannot wrap a module twice).
    twice = host.generate([f"{rows[0]} <lora:grid:0.5> <lora:grid:0.5>"], seed=7, **kw)[0]
    assert np.array_equal(np.asarray(twice), grid[2])

    write_random_lora(host, "grid", seed=2)  # retrained under the same name
    del lora_reads[:]
    again = [np.asarray(im) for im in host.generate(cells[:3], seed=7, **kw)]
    assert lora_reads == ["grid.safetensors"]
    assert np.array_equal(again[0], grid[0]) and not np.array_equal(again[2], grid[2])


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


def test_a_v_prediction_lora_is_sampled_as_its_base_model_predicts(host_with_lora) -> None:
    """The Test grid of a LoRA trained with v_parameterization / zero_terminal_snr samples with
    that schedule (its metadata says so), every cell alike; LoRAs that disagree are refused."""
    from lib_lora.hosts.standalone import lora_schedule, make_scheduler
    from lib_lora.training.export import read_lora, write_lora
    from lib_lora.training.family import SD15
    from lib_lora.training.schedule import for_run

    host = host_with_lora
    tensors, md = read_lora(host.lora_dir() / "probe.safetensors")
    write_lora(host.lora_dir() / "vpred.safetensors", tensors,
               {**md, "modelspec.prediction_type": "v", "ss_zero_terminal_snr": "True"}, overwrite=True)
    eps, v = host.lora_dir() / "probe.safetensors", host.lora_dir() / "vpred.safetensors"
    assert lora_schedule([eps]) == (False, False) and lora_schedule([]) == (False, False)
    assert lora_schedule([v, v]) == (True, True)
    kohya_v = write_lora(host.lora_dir() / "kohya_v.safetensors", tensors, {**md, "ss_v_parameterization": "True"},
                         overwrite=True)  # an older kohya file: no modelspec, its own key
    assert lora_schedule([kohya_v]) == (True, False)
    sched = make_scheduler("DDIM", for_run(SD15, *lora_schedule([v])))
    assert sched.config.prediction_type == "v_prediction" and sched.config.rescale_betas_zero_snr
    kw = dict(steps=4, width=64, height=64, cfg_scale=5.0)
    # Weight 0 adds nothing: what differs is the schedule the cell is sampled with.
    a, b = (np.asarray(host.generate([f"a face <lora:{n}:0>"], seed=7, **kw)[0], dtype=np.int16) for n in ("probe", "vpred"))
    assert np.abs(a - b).mean() > 1
    with pytest.raises(UserError, match="different noise schedules"):
        host.generate(["a face <lora:probe:1>", "a face <lora:vpred:1>"], seed=7, **kw)
