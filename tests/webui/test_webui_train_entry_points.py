"""Both ways a training starts inside the WebUI (the Train tab, the REST route) train the same
TrainConfig for the same request: the one `prepare_train_config` decides the LoRA folder, the
run folder, the base model's name, the device and the precision of the host's weights."""

from __future__ import annotations

import json
import time

import pytest
import torch
from PIL import Image

from lib_lora.config import TrainConfig, to_dict

REQUEST = dict(resolution=64, enable_buckets=False, max_steps=1, dim=4, alpha=2.0, lr="1e-3", optimizer="adamw",
               cache_latents_to_disk=False, save_precision="fp32", log_every_n_steps=1, seed=42,
               lr_scheduler="constant", sample_images=0, overwrite=True, restart=True, mixed_precision="auto")


def _dataset(root):
    folder = root / "data" / "2_sks"
    folder.mkdir(parents=True)
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (64, 64), colour).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"sks, tag{i}", encoding="utf-8")
    return (root / "data").resolve()


def _saved_config(host, name):
    return json.loads((host.work_dir() / "runs" / name / "config.json").read_text(encoding="utf-8"))


def test_the_train_tab_and_the_rest_route_train_the_same_config(webui, webui_model, tmp_path):
    webui.shared.sd_model = webui_model
    _both_entry_points_train_the_same_config(webui, tmp_path)


def test_on_forge_the_train_tab_and_the_rest_route_train_its_loaded_model(forge, tmp_path, state_hash):
    """Forge: the same two entry points, through its queue lock and job bookkeeping, on its own
    model objects, which are given back bit-identical."""
    engine = forge.shared.sd_model
    objs = engine.forge_objects_original
    parts = [objs.unet.model, objs.clip.cond_stage_model, objs.vae.first_stage_model]
    before = [state_hash(p) for p in parts]
    _both_entry_points_train_the_same_config(forge, tmp_path)
    assert [state_hash(p) for p in parts] == before
    assert (forge.root / "models" / "Lora" / "sks.safetensors").is_file()


def _both_entry_points_train_the_same_config(webui, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_lora.hosts import webui as host_module
    from lib_lora.hosts import webui_app
    from lib_lora.training.run_config import prepare_train_config
    from lib_lora.ui import forms
    from lib_lora.ui.app import build_tabs
    from lib_lora.ui.tab_train import run_train

    webui.shared.opts.add_option("fast_lora_preview", webui.shared.OptionInfo(False))
    webui.shared.opts.fast_lora_preview = False
    host = host_module.WebUIHost()
    dataset = _dataset(tmp_path)
    request = TrainConfig(name="sks", dataset=str(dataset), **REQUEST)

    # The REST route: a JSON body of every field, through the route's own handler and job thread.
    app = FastAPI()
    webui_app.mount_api(app, host)
    client = TestClient(app)
    body = to_dict(request)
    assert client.post("/fastlora/v1/train", json=body).status_code == 200
    for _ in range(1200):
        record = client.get("/fastlora/v1/progress").json()
        if record["status"] not in ("queued", "running", "stopping"):
            break
        time.sleep(0.05)
    assert record["status"] == "done", record
    by_rest = _saved_config(host, "sks")

    # The Train tab on the same host, with the same values in its controls.
    ctx = build_tabs(host).fast_lora
    form = ctx.parts["train"]["form"]
    assert "base_model" not in form.names  # the WebUI trains its loaded model
    values = forms.values_of(request, form.names)
    out = list(run_train(ctx, form, "sks", str(dataset), "manual", request.lr, *values))
    assert "fast-lora-msg-ok" in out[-1][0], out[-1][0]
    by_tab = _saved_config(host, "sks")

    assert by_tab == by_rest
    # ...and it is what the one preparation makes of the request on this host.
    prepared = prepare_train_config(host, request, host.backbone())
    assert to_dict(prepared) == by_rest
    assert prepared.device == "cpu"
    assert prepared.output_dir == str(host.lora_dir()) and prepared.run_dir == str(host.work_dir() / "runs" / "sks")
    assert prepared.base_model not in ("", "tiny")  # the loaded checkpoint's name, not the schema's default


def test_the_precision_rule():
    from lib_lora.errors import UserError
    from lib_lora.training.run_config import training_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # Half weights decide 'auto' and 'no'; fp32 weights follow the device.
    assert [training_precision(r, cpu, torch.bfloat16) for r in ("auto", "no", "bf16")] == ["bf16"] * 3
    assert [training_precision(r, cuda, torch.float16) for r in ("auto", "no", "fp16")] == ["fp16"] * 3
    assert training_precision("auto", cpu, torch.float32) == "no" and training_precision("auto", cuda) == "fp16"
    assert training_precision("fp16", cpu, torch.float16) == "fp16"  # no choice on fp16 weights
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        training_precision("fp16", cpu, torch.float32)


def test_half_weights_decide_auto_precision_in_the_prepared_config(tmp_path):
    from types import SimpleNamespace

    from lib_lora.hosts.standalone import StandaloneHost
    from lib_lora.training.run_config import prepare_train_config

    class OwnModel(StandaloneHost):  # no base-model choice, like the WebUI
        def __getattribute__(self, name):
            if name == "base_model":
                raise AttributeError(name)
            return super().__getattribute__(name)

    host = OwnModel(output_dir=tmp_path / "l", work_dir=tmp_path / "w")
    request = TrainConfig(name="sks", dataset="d", **REQUEST)
    for dtype, expected in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "auto")):
        bb = SimpleNamespace(device="cpu", dtype=dtype, model_name="loaded.safetensors")
        cfg = prepare_train_config(host, request, bb)
        assert (cfg.mixed_precision, cfg.base_model, cfg.device) == (expected, "loaded.safetensors", "cpu")
    chosen = prepare_train_config(StandaloneHost(output_dir=tmp_path / "l", work_dir=tmp_path / "w"), request,
                                  SimpleNamespace(device="cpu", dtype=torch.float32, model_name="tiny (built-in)"))
    assert chosen.base_model == "tiny"  # a host where the user chose the model keeps the choice
    explicit = prepare_train_config(host, TrainConfig(name="sks", dataset="d", mixed_precision="no"),
                                    SimpleNamespace(device="cpu", dtype=torch.float16, model_name="m"))
    assert explicit.mixed_precision == "no"  # a choice is the trainer's to overrule, with a message
