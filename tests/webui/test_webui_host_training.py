"""Training on the WebUI's loaded model in place, through the fake WebUI: the host's weights
and state are bit-identical afterwards (normal run, interrupt, exception, applied LoRAs), and
the LoRA equals what the standalone backbone makes from the same weights and data."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image
from webui_jobs import make_dataset, tiny_cfg

from lib_lora.errors import UserError


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path)


@pytest.fixture
def host(webui, webui_model):
    from lib_lora.hosts import webui as host_module

    webui.shared.sd_model = webui_model
    return host_module.WebUIHost()


def run(host, cfg, on_event=None):
    return host.run_job(f"Training {cfg.name}", host.train, cfg, on_event=on_event)


def test_training_in_place_leaves_the_model_bit_identical(host, webui, webui_model, dataset, state_hash, grad_flags):
    before, flags = state_hash(webui_model), grad_flags(webui_model)
    seen, live = {}, []

    def on_event(ev):
        if ev["kind"] == "loss" and "hijack" not in seen:
            seen["hijack"] = webui.sd_hijack.optimizations_applied()
            seen["frozen"] = not any(p.requires_grad for p in webui_model.parameters())
            seen["locked"] = webui.call_queue.queue_lock.locked()
        if ev["kind"] == "sample":  # made through the ldm model's own VAE, shown on the page's live preview
            live.append((ev["step"], webui.shared.state.current_image.size))

    # A sample image during the run: sampling too leaves the weights bit-identical.
    summary = run(host, tiny_cfg(dataset, max_steps=2, sample_images=1, sample_steps=3), on_event)
    assert seen == {"hijack": False, "frozen": True, "locked": True}
    assert live == [(2, (64, 64))]
    assert state_hash(webui_model) == before and grad_flags(webui_model) == flags
    assert webui.sd_hijack.optimizations_applied()  # given back to the WebUI
    assert all("forward" not in m.__dict__ for m in webui_model.modules())
    lora = webui.root / "models" / "Lora" / "sks.safetensors"
    assert summary["lora_path"] == str(lora) and lora.is_file() and not summary["interrupted"]
    card = json.loads(lora.with_suffix(".json").read_text(encoding="utf-8"))
    assert card["sd version"] == "SD1" and card["activation text"] == "sks" and card["preferred weight"] == 1.0
    assert "2 steps" in card["description"]
    assert (lora.parent / "sks.preview.png").is_file()
    assert "sks" in webui.networks.available_networks  # the card list was refreshed
    # progress went to the page's bar and the WebUI's task bookkeeping; the state was reset after
    assert ("job_no", 2) in webui.shared.state.history
    assert any(k == "textinfo" and v and "loss" in str(v) for k, v in webui.shared.state.history)
    assert webui.progress.finished_tasks and webui.progress.finished_tasks[-1].startswith("task(fastlora-")
    assert webui.shared.state.job_count == 0 and not webui.shared.state.interrupted
    assert not webui.call_queue.queue_lock.locked()


def test_interrupt_stops_cleanly_and_keeps_the_checkpoint(host, webui, webui_model, dataset, state_hash, grad_flags):
    before, flags = state_hash(webui_model), grad_flags(webui_model)

    def on_event(ev):
        if ev["kind"] == "loss" and ev["step"] == 1:
            webui.shared.state.interrupt()  # the page's Interrupt button

    summary = run(host, tiny_cfg(dataset, max_steps=3), on_event)
    assert summary["interrupted"] and summary["lora_path"] == ""
    assert list((webui.root / "fast_lora" / "runs" / "sks" / "checkpoints").glob("*interrupted*"))
    assert state_hash(webui_model) == before and grad_flags(webui_model) == flags
    assert webui.sd_hijack.optimizations_applied()
    assert not webui.shared.state.interrupted  # reset for the next job, as wrap_gradio_call does


def test_an_exception_mid_run_still_gives_the_model_back(host, webui, webui_model, dataset, state_hash, grad_flags):
    before, flags = state_hash(webui_model), grad_flags(webui_model)

    def on_event(ev):
        if ev["kind"] == "loss" and ev["step"] == 1:
            raise RuntimeError("CUDA out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        run(host, tiny_cfg(dataset, max_steps=2), on_event)
    assert state_hash(webui_model) == before and grad_flags(webui_model) == flags
    assert all("forward" not in m.__dict__ for m in webui_model.modules())
    assert webui.sd_hijack.optimizations_applied()
    assert not webui.call_queue.queue_lock.locked()


def test_loras_applied_in_place_are_taken_out_for_training_and_put_back(host, webui, webui_model, dataset, state_hash, grad_flags):
    nets = webui.networks
    unet = webui_model.model.diffusion_model
    layers = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)][:3]
    deltas = {}
    for i, m in enumerate(layers):
        m.network_layer_name = f"layer{i}"
        deltas[f"layer{i}"] = torch.full_like(m.weight, 0.01 * (i + 1))
    clean = [m.weight.detach().clone() for m in layers]
    nets.loaded_networks[:] = [nets.FakeNetwork("other_lora", deltas)]
    with torch.no_grad():  # a generation with <lora:other_lora:1> ran: deltas are in the weights
        for m in layers:
            nets.network_apply_weights(m)
    assert not torch.equal(layers[0].weight, clean[0])
    before = state_hash(webui_model)
    seen = {}

    def on_event(ev):
        if ev["kind"] == "loss" and not seen:
            seen["clean"] = all(torch.equal(m.weight, c) for m, c in zip(layers, clean, strict=True))
            seen["loaded"] = list(nets.loaded_networks)

    run(host, tiny_cfg(dataset, max_steps=2), on_event)
    assert seen == {"clean": True, "loaded": []}  # trained on the checkpoint's own weights
    assert state_hash(webui_model) == before  # and the WebUI's LoRA is back, bit for bit
    assert [n.name for n in nets.loaded_networks] == ["other_lora"]
    assert all(m.network_current_names for m in layers)


def test_medvram_placement_is_handled_and_restored(host, webui, webui_model, dataset, state_hash, grad_flags):
    webui_model.lowvram = True  # --medvram: lowvram.setup_for_low_vram ran
    webui.lowvram.module_in_gpu = webui_model.first_stage_model
    before = state_hash(webui_model)
    run(host, tiny_cfg(dataset, max_steps=1))
    assert webui.lowvram.calls >= 2 and webui.lowvram.module_in_gpu is None
    assert state_hash(webui_model) == before


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda w, m: setattr(w.shared.cmd_opts, "lowvram", True), "--lowvram"),
        (lambda w, m: setattr(m, "forge_objects", object()), "Forge"),
        (lambda w, m: setattr(m, "is_sdxl", True), "SDXL refiner"),  # sgm-flagged, without SDXL base's encoders
        (lambda w, m: setattr(m, "is_sd2", True), "SD2 or SD3"),
        (lambda w, m: setattr(w.shared, "sd_model", None), "No checkpoint is loaded"),
    ],
)
def test_refusals_say_why(host, webui, webui_model, dataset, setup, message, state_hash, grad_flags):
    setup(webui, webui_model)
    before = state_hash(webui_model)
    with pytest.raises(UserError, match=message):
        run(host, tiny_cfg(dataset))
    assert state_hash(webui_model) == before
    assert not webui.call_queue.queue_lock.locked()


def test_exported_lora_equals_the_standalone_backbones(host, webui, webui_model, dataset, tmp_path, state_hash, grad_flags,
                                                       float32_rounding):
    from lib_lora.hosts.ldm_backbone import LdmBackbone
    from lib_lora.training.export import read_lora
    from lib_lora.training.models import load_backbone
    from lib_lora.training.run import train

    # 128 px: the U-Net's middle block sees 2x2 latents. At 64 px it sees one position, where
    # self-attention's softmax is constant: its q/k LoRAs get an exactly-zero gradient, and
    # Adam turns the two backbones' different rounding noise there into unrelated weights.
    cfg = tiny_cfg(dataset, max_steps=3, resolution=128)
    ours = run(host, cfg)
    standalone = load_backbone("tiny")
    # Each latent's sample is seeded from its cache key, which names the VAE: the same VAE
    # weights under ldm and diffusers names hash differently, so tell the loop they are one.
    standalone.vae_identity = LdmBackbone(webui_model).vae_identity
    ref = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "ref"), run_dir=str(tmp_path / "ref_run")),
                backbone=standalone)
    a, meta_a = read_lora(ours["lora_path"])
    b, meta_b = read_lora(ref.lora_path)
    assert sorted(a) == sorted(b) and len(a) == 3 * (192 + 72)
    # The ldm and diffusers modules compute the same sums in another order, so the gradients
    # agree to the pass's float32 rounding bound rho (1.4e-3). Adam's update g / sqrt(v) is
    # blind to a gradient's size, so an element whose gradient is within rho of zero can move
    # either way: with gradients spread around zero that is a fraction ~rho of the elements, and
    # a tensor's update then differs by ~sqrt(rho) of its norm (the up weights start at zero,
    # so they are the update). Bound: 2 * sqrt(rho) = 7.6 %; measured <= 0.2 %. A LoRA from
    # another init or other data, or a module under another's name, differs by ~100 %.
    rho = float32_rounding(standalone.unet, standalone.text_encoder)
    for k in b:
        d, n = float((a[k].float() - b[k].float()).norm()), float(b[k].float().norm())
        assert n > 0 and d <= 2 * rho**0.5 * n, (k, d / n)
    assert any(float(b[k].abs().max()) > 0 for k in b if k.endswith("lora_up.weight"))  # it did train
    for key in ("ss_network_dim", "ss_network_alpha", "ss_steps", "ss_seed", "ss_resolution"):
        assert meta_a[key] == meta_b[key], key


def test_the_uis_own_calls_are_guarded_by_the_job(host, webui, webui_model, dataset, state_hash, grad_flags):
    """The UI's Train tab calls host.job(), host.backbone(), train() and host.after_save() itself."""
    from lib_lora.training.run import train

    before, flags = state_hash(webui_model), grad_flags(webui_model)
    cfg = tiny_cfg(dataset, max_steps=1, output_dir=str(host.lora_dir()), run_dir=str(webui.root / "ui_run"))
    with host.job("Train") as progress:
        backbone = host.backbone()
        assert not any(p.requires_grad for p in webui_model.parameters())
        assert not webui.sd_hijack.optimizations_applied()
        result = train(cfg, backbone=backbone, progress=progress)
        host.after_save(result.lora_path)
    assert state_hash(webui_model) == before and grad_flags(webui_model) == flags
    assert webui.sd_hijack.optimizations_applied()
    lora = host.lora_dir() / "sks.safetensors"
    assert lora.with_suffix(".json").is_file() and (lora.parent / "sks.preview.png").is_file()
    assert webui.processing.calls[-1]["prompts"] == ["sks, <lora:sks:1>"]


# --------------------------------------------------------------------------------------------
# The preview image made after a training: the WebUI's settings, its own phase, stoppable


def set_options(webui, **values):
    for key, value in values.items():
        webui.shared.opts.add_option(key, webui.shared.OptionInfo(value))
        setattr(webui.shared.opts, key, value)


def preview_calls(webui, name="sks"):
    return [c for c in webui.processing.calls if c["prompts"] == [f"{name}, <lora:{name}:1>"]]


def test_the_preview_follows_the_settings_after_the_model_is_given_back(host, webui, webui_model, dataset):
    set_options(webui, fast_lora_preview_width=96, fast_lora_preview_height=64, fast_lora_preview_steps=7,
                fast_lora_preview_sampler="DDIM")
    seen = []

    counts = []

    def hook(p, step):
        counts.append(webui.shared.state.job_count)
        if step == 0:  # the WebUI's own model and generation path, still under the job's lock
            seen.append((webui.sd_hijack.optimizations_applied(), webui.call_queue.queue_lock.locked(),
                         any(w.requires_grad is False for w in webui_model.parameters())))

    webui.processing.step_hooks.append(hook)
    try:
        run(host, tiny_cfg(dataset, max_steps=1))
    finally:
        webui.processing.step_hooks.remove(hook)
    [call] = preview_calls(webui)
    assert (call["size"], call["steps"], call["sampler"], call["steps_run"]) == ((96, 64), 7, "DDIM", 7)
    assert seen == [(True, True, False)]
    # One job while the WebUI samples: its bar and its console's total count the 7 steps once,
    # not job_count x steps.
    assert counts == [1] * 7
    preview = host.lora_dir() / "sks.preview.png"
    assert Image.open(preview).size == (96, 64)
    assert ("textinfo", "Making the preview image of sks") in webui.shared.state.history


def test_no_preview_when_the_setting_is_off(host, webui, dataset):
    set_options(webui, fast_lora_preview=False)
    summary = run(host, tiny_cfg(dataset, max_steps=1))
    assert summary["lora_path"] and not preview_calls(webui)
    assert not (host.lora_dir() / "sks.preview.png").exists()


def test_stop_on_the_train_tab_ends_the_preview_and_keeps_the_lora(host, webui, webui_model, dataset, state_hash):
    """The Train tab's Stop sets only the tab's job flag; during the preview it must reach the
    WebUI's sampler (state.interrupted), and the saved LoRA stays the result."""
    import time

    from lib_lora.ui import forms
    from lib_lora.ui.app import build_tabs
    from lib_lora.ui.tab_train import run_train

    total = 200
    set_options(webui, fast_lora_preview_steps=total)
    ctx = build_tabs(host).fast_lora
    form = ctx.parts["train"]["form"]
    values = forms.values_of(tiny_cfg(dataset, max_steps=1), form.names)
    before = state_hash(webui_model)
    pressed = []

    def hook(p, step):
        if "<lora:sks:1>" in p.prompt[0]:
            if step == 2:
                pressed.append(ctx.runner.stop())  # what the tab's Stop button does
            time.sleep(0.02)  # a sampling step takes time; the interrupt must come within a few

    webui.processing.step_hooks.append(hook)
    try:
        outputs = list(run_train(ctx, form, "sks", str(dataset), "manual", "1e-3", *values))
    finally:
        webui.processing.step_hooks.remove(hook)
    assert pressed == [True]
    [call] = preview_calls(webui)
    # The watcher polls every 0.05 s, i.e. every ~2.5 steps here; without it all 200 steps run.
    assert call["steps_run"] < total // 2, call
    job = ctx.runner.current
    assert {"kind": "phase", "name": "preview", "text": "Making the preview image of sks"} in job.progress.events
    assert not job.error and not job.cancelled  # the training finished: Stop only cut the preview
    lora = host.lora_dir() / "sks.safetensors"
    assert lora.is_file() and not (host.lora_dir() / "sks.preview.png").exists()  # no half-denoised preview
    assert "Saved" in outputs[-1][0] and outputs[-1][-2] == "sks"  # the last output is the Start button
    assert state_hash(webui_model) == before
    assert not webui.shared.state.interrupted and not webui.call_queue.queue_lock.locked()
