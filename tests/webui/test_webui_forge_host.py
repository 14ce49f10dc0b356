"""Training inside Forge on its loaded model, through the fake WebUI with Forge's `backend`
stand-in: Forge's weights and state are bit-identical afterwards (normal run, interrupt,
exception, a LoRA baked in by the last generation), a baked LoRA is never inside what is
trained, the model is held by Forge's memory manager during the job, and the LoRA equals
A1111's from the same checkpoint."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from webui_jobs import bake_a_lora, forge_state, make_dataset, roots, run, tiny_cfg

from lib_lora.errors import UserError


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path)


@pytest.fixture
def host(forge):
    from lib_lora.hosts import webui as host_module

    return host_module.WebUIHost()


def test_training_inside_forge_leaves_its_model_and_state_bit_identical(host, forge, dataset, state_hash, grad_flags):
    engine, mm = forge.shared.sd_model, forge.backend_mm
    mm.load_models_gpu([engine.forge_objects.vae.patcher])  # a generation left the VAE loaded
    before = forge_state(engine, mm, state_hash, grad_flags)
    seen = {}

    def on_event(ev):
        if ev["kind"] == "loss" and not seen:
            objs = engine.forge_objects_original
            seen["frozen"] = not any(p.requires_grad for r in roots(engine) for p in r.parameters())
            seen["locked"] = forge.call_queue.queue_lock.locked()
            # held by Forge's memory manager for the job: U-Net, text encoder and VAE
            seen["loaded"] = {id(lm.model) for lm in mm.current_loaded_models} >= \
                {id(objs.unet), id(objs.clip.patcher), id(objs.vae.patcher)}

    summary = run(host, tiny_cfg(dataset, max_steps=2, sample_images=1, sample_steps=3), on_event)
    assert seen == {"frozen": True, "locked": True, "loaded": True}
    assert forge_state(engine, mm, state_hash, grad_flags) == before
    lora = forge.root / "models" / "Lora" / "sks.safetensors"  # Forge's --lora-dir (models/Lora by default)
    assert summary["lora_path"] == str(lora) and lora.is_file() and not summary["interrupted"]
    assert "sks" in forge.networks.available_networks  # Forge's LoRA list refreshed: <lora:sks:1> works at once
    assert not forge.call_queue.queue_lock.locked()


def test_an_interrupt_gives_forge_its_state_back(host, forge, dataset, state_hash, grad_flags):
    engine, mm = forge.shared.sd_model, forge.backend_mm
    before = forge_state(engine, mm, state_hash, grad_flags)

    def on_event(ev):
        if ev["kind"] == "loss" and ev["step"] == 1:
            forge.shared.state.interrupt()  # Forge's Interrupt button

    summary = run(host, tiny_cfg(dataset, max_steps=3), on_event)
    assert summary["interrupted"] and summary["lora_path"] == ""
    assert list((forge.root / "fast_lora" / "runs" / "sks" / "checkpoints").glob("*interrupted*"))
    assert forge_state(engine, mm, state_hash, grad_flags) == before


def test_an_exception_gives_forge_its_state_back(host, forge, dataset, state_hash, grad_flags):
    engine, mm = forge.shared.sd_model, forge.backend_mm
    bake_a_lora(engine, mm)
    before = forge_state(engine, mm, state_hash, grad_flags)

    def on_event(ev):
        if ev["kind"] == "loss" and ev["step"] == 1:
            raise RuntimeError("CUDA out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        run(host, tiny_cfg(dataset, max_steps=2), on_event)
    assert forge_state(engine, mm, state_hash, grad_flags) == before
    assert not forge.call_queue.queue_lock.locked()


@pytest.mark.parametrize("job_fails", [False, True])
def test_a_failed_reload_at_the_end_still_unloads_ours_and_bakes_the_loras_back(job_fails, host, forge, dataset,
                                                                                state_hash, grad_flags):
    engine, mm = forge.shared.sd_model, forge.backend_mm
    bake_a_lora(engine, mm)
    baked = forge_state(engine, mm, state_hash, grad_flags)
    original = engine.forge_objects_original
    load = mm.load_models_gpu

    def on_event(ev):
        if ev["kind"] == "loss" and ev["step"] == 1:
            def fails(models, *a, **kw):  # the reload of what was loaded before runs out of memory
                mm.load_models_gpu = load
                raise RuntimeError("CUDA out of memory (simulated, reloading)")

            mm.load_models_gpu = fails
            if job_fails:
                raise RuntimeError("the job's own error")

    # The job's own error is the one the user sees; without one, the give-back's.
    with pytest.raises(RuntimeError, match="the job's own error" if job_fails else "reloading"):
        run(host, tiny_cfg(dataset, max_steps=2), on_event)
    loaded = {id(lm.model) for lm in mm.current_loaded_models}
    assert id(original.unet) not in loaded and id(original.clip.patcher) not in loaded  # ours are unloaded all the same
    after = forge_state(engine, mm, state_hash, grad_flags)
    assert after["weights"] == baked["weights"] and after["loras"] == baked["loras"]  # the LoRA is baked back in
    assert not forge.call_queue.queue_lock.locked()


def test_a_baked_lora_is_taken_out_for_training_and_baked_back(host, forge, dataset, tmp_path, state_hash, grad_flags,
                                                              one_thread):
    from lib_lora.training.export import read_lora

    engine, mm = forge.shared.sd_model, forge.backend_mm
    clean = [state_hash(r) for r in roots(engine)]
    cfg = tiny_cfg(dataset, max_steps=2)
    plain = read_lora(run(host, dataclasses.replace(cfg, name="plain"))["lora_path"])[0]

    bake_a_lora(engine, mm)
    baked = forge_state(engine, mm, state_hash, grad_flags)
    assert baked["weights"][:2] != clean[:2]  # the generation's LoRA is in U-Net and text encoder weights
    seen = {}

    def on_event(ev):
        if ev["kind"] == "loss" and not seen:
            seen["clean"] = [state_hash(r) for r in roots(engine)] == clean

    lora = read_lora(run(host, cfg, on_event)["lora_path"])[0]
    assert seen == {"clean": True}  # trained on the checkpoint's own weights
    assert forge_state(engine, mm, state_hash, grad_flags) == baked  # and the LoRA is baked back, bit for bit
    assert sorted(lora) == sorted(plain) and all(torch.equal(lora[k], plain[k]) for k in lora)


def test_the_same_lora_as_a1111_from_the_same_checkpoint(host, forge, dataset, webui_model, one_thread):
    """Forge's U-Net is ldm's tree under ldm's names: targets, names, init order and latents are
    A1111's, so the same run gives the same file (the stand-in's U-Net is ldm's code, its layers
    Forge's Linear and Conv2d: the same sums in the same order)."""
    from lib_lora.training.export import read_lora

    cfg = tiny_cfg(dataset, max_steps=3)
    ours = read_lora(run(host, cfg)["lora_path"])[0]
    engine = forge.shared.sd_model
    forge.shared.sd_model = webui_model
    try:
        theirs = read_lora(run(host, dataclasses.replace(cfg, name="a1111"))["lora_path"])[0]
    finally:
        forge.shared.sd_model = engine
    assert sorted(ours) == sorted(theirs) and len(ours) == 3 * (192 + 72)
    assert all(k.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks", "lora_te_text_model"))
               for k in ours)  # kohya's names, which Forge's key map sends onto its U-Net and clip_l
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_weights_forge_made_in_inference_mode_are_trained_around(host, forge, dataset, state_hash, grad_flags):
    """Forge bakes LoRAs and moves weights inside torch.inference_mode: its weights can be
    inference tensors, which autograd refuses to save for the backward pass."""
    engine = forge.shared.sd_model
    with torch.inference_mode():
        for root in roots(engine):
            for module in root.modules():
                for name, p in list(module._parameters.items()):
                    if p is not None:
                        module._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
    assert next(roots(engine)[0].parameters()).is_inference()
    weights = [state_hash(r) for r in roots(engine)]
    summary = run(host, tiny_cfg(dataset, max_steps=1))
    assert summary["lora_path"] and not summary["interrupted"]
    assert [state_hash(r) for r in roots(engine)] == weights


@pytest.mark.parametrize(
    "setup, message",
    [
        # an SDXL engine without SDXL base's two text encoders (the refiner's CLIP has clip_g alone)
        (lambda e: setattr(e, "is_sdxl", True), "SDXL refiner"),
        (lambda e: setattr(e, "is_sd1", False), "neither SD1.5 nor SDXL"),
        (lambda e: setattr(e.forge_objects_original.unet.model, "storage_dtype", torch.float8_e4m3fn), "Low Bits"),
    ],
)
def test_refusals_say_why(host, forge, dataset, setup, message, state_hash, grad_flags):
    engine, mm = forge.shared.sd_model, forge.backend_mm
    setup(engine)
    before = forge_state(engine, mm, state_hash, grad_flags)
    with pytest.raises(UserError, match=message):
        run(host, tiny_cfg(dataset))
    assert forge_state(engine, mm, state_hash, grad_flags) == before


def test_lycoris_types_are_refused_in_forge(host, forge, dataset, state_hash, grad_flags):
    engine, mm = forge.shared.sd_model, forge.backend_mm
    before = forge_state(engine, mm, state_hash, grad_flags)
    with pytest.raises(UserError, match="locon is not available in Forge"):
        run(host, tiny_cfg(dataset, network_type="locon"))
    assert forge_state(engine, mm, state_hash, grad_flags) == before
