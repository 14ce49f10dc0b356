"""The WebUI host with an SDXL (sgm) model loaded: detected, trained in place inside a job, and
given back bit-identical after success and after an exception."""

from __future__ import annotations

import pytest
import torch

from lib_lora.errors import UserError
from lib_lora.hosts.sgm_backbone import SgmBackbone
from lib_lora.training.backbone_sdxl import added_conditions, bucket_time_ids


@pytest.fixture
def host(webui, sgm_model):
    import fake_sgm

    from lib_lora.hosts import webui as host_module

    fake_sgm.hijack_text_embedders(sgm_model)  # as the WebUI holds it
    webui.shared.sd_model = sgm_model
    return host_module.WebUIHost()


def _train_a_step(backbone):
    from lib_lora.training.lora import LoRANetwork

    net = LoRANetwork(backbone.lora_targets(), dim=4, alpha=2).apply()
    opt = torch.optim.AdamW(list(net.parameters()), lr=1e-2)
    ids = backbone.tokenizer(["sks"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    text = backbone.encode_text(ids)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    pred = backbone.predict_noise(x, torch.tensor([300]), text.cond,
                                  added_conditions(text.pooled, bucket_time_ids([(128, 128)], (128, 128))))
    pred.pow(2).mean().backward()
    opt.step()
    return net


def test_the_loaded_sdxl_model_is_trained_in_place_and_given_back(host, webui, sgm_model, state_hash, grad_flags):
    before, flags = state_hash(sgm_model), grad_flags(sgm_model)
    with host.job("Train") as _:
        backbone = host.backbone()
        assert isinstance(backbone, SgmBackbone) and backbone.family.label == "SDXL"
        assert backbone.unet is sgm_model.model.diffusion_model  # in place: no second copy
        assert not any(p.requires_grad for p in sgm_model.parameters())
        assert not webui.sd_hijack.optimizations_applied()
        _train_a_step(backbone)
    assert state_hash(sgm_model) == before and grad_flags(sgm_model) == flags
    assert webui.sd_hijack.optimizations_applied()
    assert all("forward" not in m.__dict__ for m in sgm_model.modules())


def test_an_exception_in_the_job_gives_the_sdxl_model_back(host, webui, sgm_model, state_hash, grad_flags):
    before, flags = state_hash(sgm_model), grad_flags(sgm_model)
    with pytest.raises(RuntimeError, match="simulated"):
        with host.job("Train") as _:
            _train_a_step(host.backbone())
            raise RuntimeError("CUDA out of memory (simulated)")
    assert state_hash(sgm_model) == before and grad_flags(sgm_model) == flags
    assert all(p.grad is None for p in sgm_model.parameters())
    assert webui.sd_hijack.optimizations_applied()


@pytest.mark.parametrize("change, message", [
    (lambda m: m.conditioner.embedders.__delitem__(0), "SDXL refiner"),  # a refiner: OpenCLIP bigG only
    (lambda m: setattr(m, "is_sdxl_inpaint", True), "inpainting"),
])
def test_sdxl_variants_we_cannot_train_are_refused_in_one_sentence(host, sgm_model, change, message):
    change(sgm_model)
    with pytest.raises(UserError, match=message):
        with host.job("Train") as _:
            host.backbone()
    assert all(p.requires_grad for p in sgm_model.parameters())  # refused before anything was touched


def _rest_train(host, body):
    import time

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_lora.hosts import webui_app

    app = FastAPI()
    webui_app.mount_api(app, host)
    client = TestClient(app)
    response = client.post("/fastlora/v1/train", json=body)
    assert response.status_code == 200, response.text
    for _ in range(2400):
        record = client.get("/fastlora/v1/progress").json()
        if record["status"] not in ("queued", "running", "stopping"):
            return record
        time.sleep(0.05)
    raise AssertionError(f"the job did not end: {record}")


def test_a_rest_body_s_values_are_kept_on_sdxl_even_where_they_are_sd15_s_defaults(host, webui, tmp_path):
    """{"resolution": 512, "train_text_encoder": true} on the loaded SDXL model trains at 512 with
    the text encoder; what the body leaves out (the bucket range) is SDXL's."""
    import json

    from PIL import Image

    from lib_lora.training.export import read_lora

    webui.shared.opts.add_option("fast_lora_preview", webui.shared.OptionInfo(False))
    webui.shared.opts.fast_lora_preview = False
    folder = tmp_path / "data" / "1_sks"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "a.png")
    (folder / "a.txt").write_text("sks, red", encoding="utf-8")
    body = {"name": "xl512", "dataset": str(folder.parent), "resolution": 512, "train_text_encoder": True,
            "max_steps": 1, "dim": 4, "alpha": 2.0, "lr": "1e-3", "optimizer": "adamw", "sample_images": 0,
            "cache_latents_to_disk": False, "save_precision": "fp32", "log_every_n_steps": 1}
    record = _rest_train(host, body)
    assert record["status"] == "done", record
    saved = json.loads((host.work_dir() / "runs" / "xl512" / "config.json").read_text(encoding="utf-8"))
    assert (saved["resolution"], saved["train_text_encoder"]) == (512, True)
    assert (saved["min_bucket_reso"], saved["max_bucket_reso"]) == (512, 2048)  # not given: SDXL's
    tensors, md = read_lora(record["lora_path"])
    assert md["ss_resolution"] == "(512, 512)" and md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_te1_") for k in tensors)  # the text encoder the body asked for


def test_a_reloaded_page_shows_the_loaded_sdxl_models_values_over_the_remembered_sd15_ones(webui, webui_model,
                                                                                          sgm_model):
    """The page was built (and last used) with SD1.5 loaded, then SDXL was loaded: on reload the
    last used values come back first, then the controls left as SD1.5 filled them take SDXL's."""
    import fake_sgm

    from lib_lora.hosts import webui as host_module
    from lib_lora.training.family import SD15, SDXL
    from lib_lora.ui import app as app_mod
    from lib_lora.ui import forms, tab_train

    webui.shared.sd_model = webui_model
    host = host_module.WebUIHost()
    blocks = app_mod.build_tabs(host)
    ctx, train = blocks.fast_lora, blocks.fast_lora.parts["train"]
    form, controls = train["form"], train["controls"]
    assert train["shown"].value == "sd15" and controls["resolution"].value == SD15.default_resolution
    remembered = [c for c in ctx.remembered.values() if any(c is controls[n] for n in form.names)]
    assert any(c is controls["resolution"] for c in remembered)  # the family's fields are remembered too
    ctx.keep(remembered, [c.value for c in remembered])  # the last page's values: SD1.5's as filled

    # The page-load events: the restore first, the family refresh after it (a "then" of it).
    deps = blocks.config["dependencies"]
    restore = next(i for i, d in enumerate(deps) if set(d["outputs"]) == {c._id for c in ctx.remembered.values()})
    fn, inputs, outputs = train["refresh"]
    refresh = next(d for d in deps if d["outputs"] == [o._id for o in outputs])
    assert refresh["trigger_after"] == restore

    fake_sgm.hijack_text_embedders(sgm_model)
    webui.shared.sd_model = sgm_model  # SDXL loaded since the page was built
    restored = {key: u for key, u in zip(ctx.remembered, app_mod.restore_values(ctx), strict=True)}
    by_comp = {id(c): restored[k] for k, c in ctx.remembered.items()}
    values = []
    for n in form.names:
        u = by_comp.get(id(controls[n]))
        values.append(u.get("value") if isinstance(u, dict) and "value" in u else controls[n].value)
    out = fn(train["shown"].value, train["preset"].value, *values)
    assert out[0] == "sdxl" and "SDXL" in out[1]
    got = dict(zip(form.names, out[2:], strict=True))
    want = tab_train.filled(SDXL, train["preset"].value)
    for n in ("resolution", "min_bucket_reso", "max_bucket_reso", "train_text_encoder", "gradient_checkpointing"):
        assert got[n] == forms.values_of(want, [n])[0], n
