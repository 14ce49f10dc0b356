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
