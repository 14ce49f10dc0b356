"""Training inside Forge on its loaded SDXL engine (backend/diffusion_engine/sdxl.py), through the
fake WebUI with Forge's `backend` stand-in: Forge's weights and state are bit-identical afterwards
(normal run, interrupt, exception, a LoRA baked in by the last generation), a baked LoRA is never
inside what is trained, every key of the file is read by Forge's LoRA key map, and the LoRA equals
the standalone SDXL backbone's and A1111's (sgm model) from the same checkpoint to float32 rounding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from webui_jobs import bake_a_lora, forge_state, make_dataset, roots, run, tiny_cfg

from lib_lora.errors import UserError


@pytest.fixture
def dataset(tmp_path):
    """make_dataset's three 64 px squares and one 96 x 64 image: its SDXL time ids (original
    size 64 x 96, a crop offset) are not symmetric, so they tell each size/crop value apart."""
    from PIL import Image

    root = make_dataset(tmp_path)
    Image.new("RGB", (96, 64), (120, 90, 40)).save(root / "3_sks" / "wide.png")
    (root / "3_sks" / "wide.txt").write_text("sks, wide\n", encoding="utf-8")
    return root


@pytest.fixture
def host(forge_xl):
    from lib_lora.hosts import webui as host_module

    return host_module.WebUIHost()


def with_text_encoders(host, cfg, on_event=None):
    """A run that trains the text encoders too (SDXL's default is the U-Net alone): the request
    names train_text_encoder, as the Train tab and the REST body do."""
    from lib_lora.config import changed_fields

    given = changed_fields(cfg) | {"train_text_encoder"}
    return host.run_job(f"Training {cfg.name}", host.train, cfg, on_event=on_event, given=given)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_inside_forges_sdxl_leaves_its_model_and_state_bit_identical(host, forge_xl, dataset, state_hash,
                                                                              grad_flags, checkpointing):
    from lib_lora.hosts.forge_backbone import ForgeSDXLBackbone
    from lib_lora.training.export import read_lora

    engine, mm = forge_xl.shared.sd_model, forge_xl.backend_mm
    assert host.model_family().label == "SDXL"
    mm.load_models_gpu([engine.forge_objects.vae.patcher])  # a generation left the VAE loaded
    before = forge_state(engine, mm, state_hash, grad_flags)
    seen = {}

    def on_event(ev):
        if ev["kind"] == "loss" and not seen:
            objs = engine.forge_objects_original
            seen["frozen"] = not any(p.requires_grad for r in roots(engine) for p in r.parameters())
            seen["locked"] = forge_xl.call_queue.queue_lock.locked()
            seen["loaded"] = {id(lm.model) for lm in mm.current_loaded_models} >= \
                {id(objs.unet), id(objs.clip.patcher), id(objs.vae.patcher)}

    with host.job("Train"):
        assert isinstance(host.backbone(), ForgeSDXLBackbone)
    cfg = tiny_cfg(dataset, max_steps=2, sample_images=1, sample_steps=3, gradient_checkpointing=checkpointing)
    summary = with_text_encoders(host, cfg, on_event)
    assert seen == {"frozen": True, "locked": True, "loaded": True}
    assert forge_state(engine, mm, state_hash, grad_flags) == before
    lora = forge_xl.root / "models" / "Lora" / "sks.safetensors"
    assert summary["lora_path"] == str(lora) and not summary["interrupted"]
    tensors, meta = read_lora(lora)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    # U-Net, clip_l and clip_g: Forge's encoders are transformers' CLIP, so text encoder 2 trains too
    assert {k.split("_")[1] for k in tensors} == {"unet", "te1", "te2"}
    assert "sks" in forge_xl.networks.available_networks


def test_an_interrupt_gives_forges_sdxl_state_back(host, forge_xl, dataset, state_hash, grad_flags):
    engine, mm = forge_xl.shared.sd_model, forge_xl.backend_mm
    before = forge_state(engine, mm, state_hash, grad_flags)

    def on_event(ev):
        if ev["kind"] == "loss" and ev["step"] == 1:
            forge_xl.shared.state.interrupt()

    summary = with_text_encoders(host, tiny_cfg(dataset, max_steps=3), on_event)
    assert summary["interrupted"] and summary["lora_path"] == ""
    assert forge_state(engine, mm, state_hash, grad_flags) == before


def test_an_exception_gives_forges_sdxl_state_back(host, forge_xl, dataset, state_hash, grad_flags):
    engine, mm = forge_xl.shared.sd_model, forge_xl.backend_mm
    bake_a_lora(engine, mm)
    before = forge_state(engine, mm, state_hash, grad_flags)

    def on_event(ev):
        if ev["kind"] == "loss" and ev["step"] == 1:
            raise RuntimeError("CUDA out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        with_text_encoders(host, tiny_cfg(dataset, max_steps=2), on_event)
    assert forge_state(engine, mm, state_hash, grad_flags) == before
    assert not forge_xl.call_queue.queue_lock.locked()


def _forge_keys(engine):
    """(U-Net keys, U-Net config, CLIP keys) as Forge's key map sees them: the KModel's
    `diffusion_model.*` and the JointTextEncoder's `clip_l.transformer.*` / `clip_g.transformer.*`."""
    from comfy_helpers import unet_config_from_keys

    objs = engine.forge_objects_original
    unet_keys = {k for k in objs.unet.model.state_dict() if k.startswith("diffusion_model.")}
    return unet_keys, unet_config_from_keys(unet_keys), set(objs.clip.cond_stage_model.state_dict())


def test_forges_key_map_reads_every_key_and_bakes_our_lora(host, forge_xl, dataset, state_hash):
    """`<lora:sks:1>` in Forge: load_lora_for_models's key maps (tests/comfy_helpers.py, Forge's
    rules checked in forge_facts.json) read every tensor of the file, each patch lands on a weight
    of the loaded model (ModelPatcher.add_patches keeps it), and the baked weight is W + up @ down
    * alpha / rank."""
    from comfy_helpers import forge_load

    from lib_lora.training.export import read_lora

    engine, mm = forge_xl.shared.sd_model, forge_xl.backend_mm
    lora = read_lora(with_text_encoders(host, tiny_cfg(dataset, max_steps=2))["lora_path"])[0]
    unet_keys, config, clip_keys = _forge_keys(engine)
    patches, unread = forge_load(lora, unet_keys, config, clip_keys)
    assert sorted(unread) == [] and len(patches) == sum(k.endswith(".lora_up.weight") for k in lora)
    assert {k.split(".")[0] for k in patches} == {"diffusion_model", "clip_l", "clip_g"}
    original = engine.forge_objects_original
    unet, clip = original.unet.clone(), original.clip.clone()
    simple = {k: ("lora", (up, down, alpha)) for k, (_, (up, down, alpha, *_)) in patches.items()}
    on_unet = unet.add_patches(filename="sks.safetensors", patches={k: v for k, v in simple.items() if k in unet_keys})
    on_clip = clip.add_patches(filename="sks.safetensors", patches={k: v for k, v in simple.items() if k in clip_keys})
    assert len(on_unet) + len(on_clip) == len(patches)  # every patch found its weight
    key = next(k for k in on_clip if k.startswith("clip_g."))
    w = original.clip.cond_stage_model.state_dict()[key].clone()
    engine.forge_objects.unet, engine.forge_objects.clip = unet, clip
    mm.load_models_gpu([unet, clip.patcher])
    up, down, alpha = simple[key][1]
    expected = w + up @ down * (alpha / down.shape[0])
    baked = clip.cond_stage_model.state_dict()[key]
    # Forge's fp32 merge; one rank-4 product per element: a few float32 ulps of the weight
    torch.testing.assert_close(baked, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(baked, w)


def _assert_close_to_rounding(a, b, rho):
    """The bound of test_webui_host_training.py::test_exported_lora_equals_the_standalone_backbones:
    two implementations of the same sums agree to the pass's float32 rounding rho; Adam's update
    is blind to a gradient's size, so elements whose gradient is within rho of zero may move
    either way, and a tensor's update differs by ~sqrt(rho) of its norm. Bound 2 * sqrt(rho); a
    LoRA from another init, other data or a module under another's name differs by ~100 %."""
    assert sorted(a) == sorted(b)
    unused, worst = [], [0.0]
    for k in b:
        d, n = float((a[k].float() - b[k].float()).norm()), float(b[k].float().norm())
        if n == 0:  # an up weight that got no gradient, on both: still all zero
            unused.append(k)
            assert d == 0, k
            continue
        assert d <= 2 * rho**0.5 * n, (k, d / n)
        worst[0] = max(worst[0], d / n)
    print(f"largest relative difference {worst[0]:.2e}, bound {2 * rho**0.5:.2e}")
    return unused
    assert any(float(b[k].abs().max()) > 0 for k in b if k.endswith("lora_up.weight"))  # it did train


def test_the_same_lora_as_the_standalone_sdxl_backbone(host, forge_xl, dataset, tmp_path, float32_rounding):
    from lib_lora.config import changed_fields, for_family
    from lib_lora.training.export import read_lora
    from lib_lora.training.family import SDXL
    from lib_lora.training.models_sdxl import load_backbone
    from lib_lora.training.run import train

    cfg = tiny_cfg(dataset, max_steps=3)
    ours = read_lora(with_text_encoders(host, cfg)["lora_path"])
    standalone = load_backbone("tiny-sdxl")
    with host.job("Train"):
        standalone.vae_identity = host.backbone().vae_identity  # the same VAE weights under other names
    ref_cfg = for_family(cfg, SDXL, changed_fields(cfg) | {"train_text_encoder"})
    ref = read_lora(train(dataclasses.replace(ref_cfg, output_dir=str(tmp_path / "ref"), run_dir=str(tmp_path / "ref_run")),
                          backbone=standalone).lora_path)
    n_te1, n_te2 = (sum(k.startswith(p) and k.endswith(".alpha") for k in ref[0]) for p in ("lora_te1_", "lora_te2_"))
    assert n_te1 == 72 and n_te2 == 6 * standalone.text_encoder_2.config.num_hidden_layers
    unused = _assert_close_to_rounding(ours[0], ref[0], float32_rounding(standalone.unet, standalone.text_encoder,
                                                                         standalone.text_encoder_2))
    # SDXL reads TE1's penultimate layer: its last layer's LoRA gets no gradient (TE2's last
    # layer makes the pooled output, so all of TE2 trains)
    assert sorted(unused) == sorted(k for k in ref[0] if k.startswith("lora_te1_text_model_encoder_layers_11_")
                                    and k.endswith("lora_up.weight"))
    for key in ("ss_network_dim", "ss_network_alpha", "ss_steps", "ss_seed", "ss_resolution", "ss_base_model_version"):
        assert ours[1][key] == ref[1][key], key


def test_the_same_lora_as_a1111s_sdxl_model(host, forge_xl, dataset, sgm_model, float32_rounding):
    """SDXL's default run (the U-Net alone) on A1111's sgm model from the same file: the same
    targets in the same order (the standalone order on both), the same latents; A1111's bigG is
    OpenCLIP's fused attention, Forge's transformers' split one, so the conditioning agrees to
    float32 rounding, not bit for bit."""
    import fake_sgm

    from lib_lora.training.export import read_lora

    cfg = tiny_cfg(dataset, max_steps=3)
    ours = read_lora(run(host, cfg)["lora_path"])[0]
    engine = forge_xl.shared.sd_model
    fake_sgm.hijack_text_embedders(sgm_model)
    forge_xl.shared.sd_model = sgm_model
    try:
        theirs = read_lora(run(host, dataclasses.replace(cfg, name="a1111"))["lora_path"])[0]
    finally:
        forge_xl.shared.sd_model = engine
    assert all(k.startswith("lora_unet_") for k in ours)  # SDXL's default: the U-Net alone
    _assert_close_to_rounding(ours, theirs, float32_rounding(sgm_model.model.diffusion_model, sgm_model.conditioner))


def test_a_baked_lora_is_taken_out_of_forges_sdxl_and_baked_back(host, forge_xl, dataset, state_hash, grad_flags,
                                                                 one_thread):
    from lib_lora.training.export import read_lora

    engine, mm = forge_xl.shared.sd_model, forge_xl.backend_mm
    clean = [state_hash(r) for r in roots(engine)]
    cfg = tiny_cfg(dataset, max_steps=2)
    plain = read_lora(with_text_encoders(host, dataclasses.replace(cfg, name="plain"))["lora_path"])[0]
    bake_a_lora(engine, mm)
    baked = forge_state(engine, mm, state_hash, grad_flags)
    assert baked["weights"][:2] != clean[:2]
    seen = {}

    def on_event(ev):
        if ev["kind"] == "loss" and not seen:
            seen["clean"] = [state_hash(r) for r in roots(engine)] == clean

    lora = read_lora(with_text_encoders(host, cfg, on_event)["lora_path"])[0]
    assert seen == {"clean": True}
    assert forge_state(engine, mm, state_hash, grad_flags) == baked
    assert sorted(lora) == sorted(plain) and all(torch.equal(lora[k], plain[k]) for k in lora)


def test_lycoris_types_are_refused_on_forges_sdxl(host, forge_xl, dataset, state_hash, grad_flags):
    engine, mm = forge_xl.shared.sd_model, forge_xl.backend_mm
    before = forge_state(engine, mm, state_hash, grad_flags)
    with pytest.raises(UserError, match="loha is not available in Forge"):
        run(host, tiny_cfg(dataset, network_type="loha"))
    assert forge_state(engine, mm, state_hash, grad_flags) == before


@pytest.mark.parametrize(
    "setup, message",
    [
        # the refiner's CLIP holds clip_g alone
        (lambda e: delattr(e.forge_objects_original.clip.cond_stage_model, "clip_l"), "SDXL refiner"),
        (lambda e: setattr(e, "is_inpaint", True), "inpainting"),
        (lambda e: setattr(e.forge_objects_original.unet.model, "storage_dtype", torch.float8_e4m3fn), "Low Bits"),
    ],
)
def test_sdxl_refusals_say_why(host, forge_xl, dataset, setup, message, state_hash, grad_flags):
    engine, mm = forge_xl.shared.sd_model, forge_xl.backend_mm
    setup(engine)
    before = forge_state(engine, mm, state_hash, grad_flags)
    with pytest.raises(UserError, match=message):
        run(host, tiny_cfg(dataset))
    assert forge_state(engine, mm, state_hash, grad_flags) == before


# --------------------------------------------------------------------------------------------
# The backbone's computations against the standalone SDXL backbone's (what the LoRA comparison
# above cannot resolve: a few Adam steps move a LoRA by the gradient's sign, nearly blind to it)


@pytest.fixture(scope="module")
def sdxl_backbone():
    from lib_lora.training.models_sdxl import load_backbone

    return load_backbone("tiny-sdxl")


def test_forges_sdxl_conditioning_and_prediction_are_the_standalone_backbones(forge_xl, sdxl_backbone):
    from lib_lora.hosts.forge_backbone import ForgeSDXLBackbone
    from lib_lora.training.backbone_sdxl import added_conditions, bucket_time_ids

    bb = ForgeSDXLBackbone(forge_xl.shared.sd_model)
    ids = bb.tokenizer(["a photo of sks", "1girl, smile"], padding="max_length", max_length=77,
                       return_tensors="pt").input_ids
    ids = torch.cat([ids, ids.flip(0)], dim=1)  # two 77-token chunks
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10, 900])
    time_ids = bucket_time_ids([(640, 480), (512, 512)], (512, 384), flipped=[True, False])
    with torch.no_grad():
        ours, ref = bb.encode_text(ids), sdxl_backbone.encode_text(ids)
        # float32 through two implementations of the same layers (ldm/sgm vs diffusers modules)
        torch.testing.assert_close(ours.cond, ref.cond, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.pooled, ref.pooled, rtol=1e-4, atol=1e-5)
        added = added_conditions(ref.pooled, time_ids)
        pred = bb.predict_noise(x, t, ref.cond, added)
        torch.testing.assert_close(pred, sdxl_backbone.predict_noise(x, t, ref.cond, added), rtol=1e-4, atol=1e-5)
        # each of the six values reaches the U-Net in its own place
        swapped = bb.predict_noise(x, t, ref.cond, added_conditions(ref.pooled, time_ids[:, [1, 0, 3, 2, 5, 4]]))
    assert not torch.allclose(pred, swapped, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="added conditioning"):
        bb.predict_noise(x, t, ref.cond)


def test_forges_sdxl_targets_are_the_standalone_backbones_in_its_order(forge_xl, sdxl_backbone):
    """The same kohya names (TE2 included) in the same order: a seed initialises the same LoRA."""
    from lib_lora.hosts.forge_backbone import ForgeSDXLBackbone

    bb = ForgeSDXLBackbone(forge_xl.shared.sd_model)
    for conv in (False, True):
        ours, ref = bb.lora_targets(conv), sdxl_backbone.lora_targets(conv)
        assert [t.name for t in ours] == [t.name for t in ref]
        assert all(a.module.weight.shape == b.module.weight.shape for a, b in zip(ours, ref, strict=True))
    assert {t.name.split("_")[1] for t in bb.lora_targets()} == {"unet", "te1", "te2"}


def test_forges_sdxl_latents_are_the_standalone_backbones(forge_xl, sdxl_backbone):
    from lib_lora.hosts.forge_backbone import ForgeSDXLBackbone

    bb = ForgeSDXLBackbone(forge_xl.shared.sd_model)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    torch.manual_seed(5)
    ours = bb.encode_images(pixels)
    torch.manual_seed(5)
    ref = sdxl_backbone.encode_images(pixels)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)  # SDXL's scale, 0.13025


def test_gradient_checkpointing_gives_the_same_lora_on_forges_sdxl(host, forge_xl, dataset, sdxl_backbone,
                                                                    float32_rounding):
    """Recomputing each block in the backward pass (the U-Net's blocks, both text encoders'
    layers) runs the same operations; only the order in which autograd adds up a tensor's
    gradient from its several uses (the context feeds every attn2) differs, so the file agrees
    to float32 rounding, and every text-encoder LoRA SDXL uses still gets its gradient."""
    from lib_lora.training.export import read_lora

    plain = read_lora(with_text_encoders(host, tiny_cfg(dataset, max_steps=2, name="plain"))["lora_path"])[0]
    ckpt = read_lora(with_text_encoders(host, tiny_cfg(dataset, max_steps=2, name="ckpt",
                                                        gradient_checkpointing=True))["lora_path"])[0]
    unused = _assert_close_to_rounding(ckpt, plain, float32_rounding(
        sdxl_backbone.unet, sdxl_backbone.text_encoder, sdxl_backbone.text_encoder_2))
    assert all(k.startswith("lora_te1_text_model_encoder_layers_11_") for k in unused)


def test_the_tabs_time_estimate_on_forges_sdxl_comes_from_a_run_on_that_model(host, forge_xl, tmp_path):
    """Seen on the real Forge (2026-12-02): with its SDXL model loaded, the Train tab's estimate
    was an SD1.5 run's 1.5 s per step (the newest record, any model taken), where SDXL took 26 s.
    The host names its loaded checkpoint, as the run records it; with no file name, any model."""
    from types import SimpleNamespace

    from lib_lora.config import TrainConfig
    from lib_lora.training import timing
    from lib_lora.ui import tab_train
    from lib_lora.ui.context import UIContext

    cfg = TrainConfig(name="preview", dataset=str(tmp_path), resolution=64)
    runs = host.work_dir() / "runs"
    for at, (run_name, model, sps) in enumerate((("on_xl", "xl_base.safetensors", 26.0),
                                                 ("on_sd15", "sd15.safetensors", 1.5))):
        rec = timing.record(dataclasses.replace(cfg, base_model=model), "cpu", sps)
        timing.save(runs / run_name, {**rec, "measured_at": 1000.0 + at})  # the SD1.5 run is the newest
    form = tab_train.TrainForm(["dim"], has_base_model=False)  # the WebUI trains the model it has loaded
    ctx = UIContext(host=host)
    forge_xl.shared.sd_model.sd_checkpoint_info = SimpleNamespace(filename=str(tmp_path / "xl_base.safetensors"))
    assert host.loaded_model_name() == "xl_base.safetensors"
    assert "26.00 s per step, measured by the run 'on_xl'" in tab_train.time_estimate(ctx, form, cfg, 10)
    del forge_xl.shared.sd_model.sd_checkpoint_info  # no file to name: the newest run on any model
    assert "1.50 s per step, measured by the run 'on_sd15'" in tab_train.time_estimate(ctx, form, cfg, 10)
