"""By hand: train with ForgeBackbone on Forge's REAL `backend` classes (CPU), not the stand-in.

    python tests/webui/tools/forge_real_backend_check.py <forge src dir> [sd15|sdxl|both]

<forge src dir> holds Forge's `backend/` and `packages_3rdparty/` (git archive of a Forge
commit) and `huggingface_guess/` (the commit Forge's launcher pins). Forge's WebUI itself
(`modules/`, gradio) is not needed: the tiny SD1.5 checkpoint's parts are built the way
backend/loader.py builds them (Forge's U-Net from huggingface_guess's unet_config, transformers'
CLIPTextModel and Forge's VAE, all under `using_forge_operations`), wrapped in Forge's
patchers, and then:

1. Forge's own LoRA key map (`model_lora_keys_unet` / `model_lora_keys_clip` + `load_lora`)
   is run on a LoRA file trained by ForgeBackbone: every key must match;
2. that LoRA is baked in by Forge (`add_patches` on clones, `memory_management.load_models_gpu`);
3. a second training runs inside `forge_training_state`: it must see the clean weights, and
   afterwards every weight is bit-identical to the baked state, the loaders' state and the memory
   manager's loaded list are as before.

With `sdxl` (or `both`) the same three checks run on the tiny-sdxl file built as Forge builds an
SDXL model (its U-Net from huggingface_guess's detected config, clip_l and clip_g as
IntegratedCLIP over transformers' CLIPTextModel, the file's OpenCLIP weights converted by
huggingface_guess's `SDXL.process_clip_state_dict`, the two ClassicTextProcessingEngines and the
Timestep embedder StableDiffusionXL makes), with `ForgeSDXLBackbone`; and before them, the
conditioning ForgeSDXLBackbone computes is compared with what Forge's own text engines give
for the same prompt (crossattn and pooled) and with `vector` as get_learned_conditioning
builds it from the engine's embedder.

Prints what it checked; exits non-zero on the first failure. Not part of the test suite (it needs
Forge's source, which CI does not have).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import tempfile
from pathlib import Path


def _setup(src: str) -> None:
    sys.argv = [sys.argv[0], "--always-cpu"]  # Forge's backend.args reads the command line
    sys.path[:0] = [src, os.path.join(src, "packages_3rdparty"), str(Path(__file__).resolve().parents[2])]


def _hashes(roots) -> list[str]:
    import torch

    out = []
    for r in roots:
        h = hashlib.sha256()
        for k, t in sorted(r.state_dict().items()):
            h.update(k.encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        out.append(h.hexdigest()[:16])
    return out


def _engine(unet_patcher, clip, vae, **flags):
    """The attributes of Forge's diffusion engines (sd15.py / sdxl.py) that we read."""
    from backend.diffusion_engine.base import ForgeObjects

    engine = type("Engine", (), {"is_sd1": False, "is_sdxl": False, "is_inpaint": False,
                                 "current_lora_hash": str([])})()
    for k, v in flags.items():
        setattr(engine, k, v)
    engine.forge_objects = ForgeObjects(unet=unet_patcher, clip=clip, vae=vae, clipvision=None)
    engine.forge_objects_original = engine.forge_objects.shallow_copy()
    engine.forge_objects_after_applying_lora = engine.forge_objects.shallow_copy()
    return engine


def _unet(unet_config, weights, estimated):
    import torch
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.operations import using_forge_operations
    from backend.patcher.unet import UnetPatcher
    from backend.state_dict import load_state_dict
    from diffusers import DDPMScheduler

    cpu = torch.device("cpu")
    for key in ("image_size", "legacy", "use_temporal_resblock", "use_temporal_attention"):
        unet_config.pop(key, None)  # detection's keys the U-Net does not take (the loader's config has none)
    with using_forge_operations(device=cpu, dtype=torch.float32, manual_cast_enabled=False):
        unet = IntegratedUNet2DConditionModel.from_config(unet_config).to(device=cpu, dtype=torch.float32)
    load_state_dict(unet, weights)
    unet._internal_dict = unet_config  # as backend/loader.py sets it on a ConfigMixin model
    unet.storage_dtype = unet.computation_dtype = torch.float32
    unet.load_device = unet.offload_device = unet.initial_device = cpu
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return UnetPatcher.from_model(model=unet, diffusers_scheduler=scheduler, config=estimated)


def _clip(config, weights):
    """backend/loader.py's CLIP text encoder: IntegratedCLIP over CLIPTextModel, text_projection added."""
    import torch
    from backend.nn.clip import IntegratedCLIP
    from backend.operations import using_forge_operations
    from backend.state_dict import load_state_dict
    from transformers import CLIPTextModel, modeling_utils

    cpu = torch.device("cpu")
    with modeling_utils.no_init_weights(), using_forge_operations(device=cpu, dtype=torch.float32, manual_cast_enabled=True):
        model = IntegratedCLIP(CLIPTextModel, config, add_text_projection=True).to(device=cpu, dtype=torch.float32)
    load_state_dict(model, weights, ignore_errors=["transformer.text_projection.weight",
                                                   "transformer.text_model.embeddings.position_ids", "logit_scale"],
                    log_name="CLIPTextModel")
    return model


def _vae(vae_config, weights):
    import torch
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.operations import using_forge_operations
    from backend.patcher.vae import VAE
    from backend.state_dict import load_state_dict

    with using_forge_operations(device=torch.device("cpu"), dtype=torch.float32):
        vae_model = IntegratedAutoencoderKL.from_config({k: v for k, v in vae_config.items() if not k.startswith("_")})
    load_state_dict(vae_model, weights, ignore_start="loss.")
    return VAE(model=vae_model)


def _part(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def build_sd15():
    """The tiny SD1.5 checkpoint as backend/loader.py builds a model: (engine, backbone class)."""
    from types import SimpleNamespace

    import huggingface_guess.detection as detection
    from backend.patcher.clip import CLIP
    from huggingface_guess.model_list import SD15
    from ldm_shapes import TINY_LDM_UNET_KWARGS

    from lib_lora.hosts.forge_backbone import ForgeBackbone
    from lib_lora.training.models import read_state_dict
    from lib_lora.training.tiny_model import ensure_tiny_checkpoint, sd15_configs, tiny_clip_config
    from lib_lora.training.tokenizer import load_clip_tokenizer

    sd = read_state_dict(ensure_tiny_checkpoint())
    unet_config = detection.detect_unet_config(sd, "model.diffusion_model.")
    # SD15's unet_extra_config in huggingface_guess/model_list.py (num_heads 8 there; the tiny
    # model's own head count here: its shapes do not match SD15's entry, which needs context 768)
    unet_config.update(num_heads=TINY_LDM_UNET_KWARGS["num_heads"], num_head_channels=-1)
    # the loader passes huggingface_guess's estimated config; the key map reads its repo name
    estimated = SimpleNamespace(huggingface_repo=SD15.huggingface_repo, unet_config=unet_config)
    unet_patcher = _unet(unet_config, _part(sd, "model.diffusion_model."), estimated)
    clip_l = _clip(tiny_clip_config(), {f"transformer.{k}": v for k, v in _part(sd, "cond_stage_model.transformer.").items()})
    clip = CLIP(model_dict={"clip_l": clip_l}, tokenizer_dict={"clip_l": load_clip_tokenizer()})
    vae = _vae(sd15_configs()[1], _part(sd, "first_stage_model."))
    return _engine(unet_patcher, clip, vae, is_sd1=True), ForgeBackbone


def build_sdxl():
    """The tiny-sdxl file as backend/loader.py builds an SDXL model, with what StableDiffusionXL's
    __init__ adds (its two text processing engines, which wrap the token embeddings, and the
    Timestep embedder): (engine, backbone class)."""
    import types
    from types import SimpleNamespace

    import huggingface_guess.detection as detection
    from huggingface_guess.model_list import SDXL

    shared = types.ModuleType("modules.shared")  # classic_engine reads opts.emphasis from A1111's modules
    shared.opts = SimpleNamespace(emphasis="Original")  # Forge's default
    sys.modules.setdefault("modules", types.ModuleType("modules"))
    sys.modules["modules.shared"] = shared
    from backend.nn.unet import Timestep
    from backend.patcher.clip import CLIP
    from backend.text_processing.classic_engine import ClassicTextProcessingEngine

    from lib_lora.hosts.forge_backbone import ForgeSDXLBackbone
    from lib_lora.training.models import read_state_dict
    from lib_lora.training.tiny_model import TINY_SDXL_TIME_DIM, ensure_tiny_checkpoint, sdxl_configs
    from lib_lora.training.tokenizer import load_clip_tokenizer, load_clip_tokenizer_2

    sd = read_state_dict(ensure_tiny_checkpoint(family="sdxl"))
    unet_config = detection.detect_unet_config(sd, "model.diffusion_model.")
    unet_config.update(num_heads=-1, num_head_channels=64)  # sd_xl_base.yaml's head width
    estimated = SimpleNamespace(huggingface_repo=SDXL.huggingface_repo, unet_config=unet_config)
    unet_patcher = _unet(unet_config, _part(sd, "model.diffusion_model."), estimated)
    _, vae_config, te1_cfg, te2_cfg = sdxl_configs()
    te = SDXL(unet_config).process_clip_state_dict(dict(sd))  # clip_l.transformer.*, clip_g.transformer.*
    clip_l, clip_g = _clip(te1_cfg, _part(te, "clip_l.")), _clip(te2_cfg, _part(te, "clip_g."))
    clip = CLIP(model_dict={"clip_l": clip_l, "clip_g": clip_g},
                tokenizer_dict={"clip_l": load_clip_tokenizer(), "clip_g": load_clip_tokenizer_2()})
    vae = _vae({**vae_config, "scaling_factor": 0.13025}, _part(sd, "first_stage_model."))
    engine = _engine(unet_patcher, clip, vae, is_sdxl=True)
    no_embeddings = tempfile.mkdtemp(prefix="forge_embeddings_")
    for key, last in (("clip_l", False), ("clip_g", True)):  # sdxl.py's arguments (forge_facts.json "sdxl")
        setattr(engine, f"text_processing_engine_{key[-1]}", ClassicTextProcessingEngine(
            text_encoder=getattr(clip.cond_stage_model, key), tokenizer=getattr(clip.tokenizer, key),
            embedding_dir=no_embeddings, embedding_key=key, embedding_expected_shape=2048, emphasis_name="Original",
            text_projection=last, minimal_clip_skip=2, clip_skip=2, return_pooled=last, final_layer_norm=False))
    engine.embedder = Timestep(TINY_SDXL_TIME_DIM)  # Forge's Timestep(256) at the tiny U-Net's width
    return engine, ForgeSDXLBackbone


def check_sdxl_conditioning(engine, backbone_class) -> None:
    """ForgeSDXLBackbone's context, pooled output and y vector against Forge's own: its two text
    engines' outputs and get_learned_conditioning's concatenations, for one prompt."""
    import torch

    bb = backbone_class(engine)
    prompt = "a photo of sks, smiling"
    with torch.no_grad():
        cond_l = engine.text_processing_engine_l([prompt])
        cond_g, pooled = engine.text_processing_engine_g([prompt])
        height, width, crop_h, crop_w = 640, 512, 16, 8
        flat = torch.flatten(torch.cat([engine.embedder(torch.Tensor([v]))
                                        for v in (height, width, crop_h, crop_w, height, width)])).unsqueeze(0)
        ids = bb.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
        ours = bb.encode_text(ids)
        y = bb.y_vector({"text_embeds": ours.pooled,
                         "time_ids": torch.tensor([[height, width, crop_h, crop_w, height, width]], dtype=torch.float32)})
    crossattn, vector = torch.cat([cond_l, cond_g], dim=2), torch.cat([pooled, flat.to(pooled)], dim=1)
    d = [float((a - b).abs().max()) for a, b in ((ours.cond, crossattn), (ours.pooled, pooled), (y, vector))]
    print(f"SDXL conditioning vs Forge's text engines and vector: max |difference| crossattn {d[0]:.2e}, "
          f"pooled {d[1]:.2e}, vector {d[2]:.2e}")
    torch.testing.assert_close(ours.cond, crossattn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.pooled, pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, vector, rtol=1e-5, atol=1e-6)


def check(engine, backbone_class) -> None:
    import tempfile

    import torch
    from backend import memory_management as mm
    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
    from webui_jobs import make_dataset, tiny_cfg

    from lib_lora.hosts.forge_backbone import forge_training_state
    from lib_lora.training.export import read_lora
    from lib_lora.training.run import train

    objs = engine.forge_objects_original
    unet_patcher, clip, vae = objs.unet, objs.clip, objs.vae
    roots = [unet_patcher.model, clip.cond_stage_model, vae.first_stage_model]
    te = clip.cond_stage_model
    print("built from Forge's classes:", type(unet_patcher.model.diffusion_model).__module__,
          type(unet_patcher.model.diffusion_model).__name__, "|",
          type(te.clip_l.transformer.text_model.encoder.layers[0].self_attn.q_proj).__qualname__, "|", list(te._modules))
    targets = backbone_class(engine).lora_targets()
    n_unet = sum(t.name.startswith("lora_unet_") for t in targets)

    clean = _hashes(roots)
    tmp = Path(tempfile.mkdtemp(prefix="forge_real_"))
    data = make_dataset(tmp)
    cfg = dataclasses.replace(tiny_cfg(data, max_steps=3), output_dir=str(tmp / "lora"), run_dir=str(tmp / "run"))

    # -- 1: a training, and Forge's key map over its file -------------------------------------
    with forge_training_state(engine):
        result = train(cfg, backbone=backbone_class(engine))
    assert _hashes(roots) == clean, "weights changed by a training without baked LoRAs"
    lora, _ = read_lora(result.lora_path)
    unet_keys = model_lora_keys_unet(unet_patcher.model, {})
    clip_keys = model_lora_keys_clip(clip.cond_stage_model, {})
    lora_unet, rest = load_lora(dict(lora), unet_keys)
    lora_clip, rest = load_lora(rest, clip_keys)
    print(f"Forge's key map: {len(lora)} tensors -> {len(lora_unet)} U-Net and {len(lora_clip)} CLIP weights "
          f"({sorted({k.split('.')[0] for k in lora_clip})}), unmatched: {sorted(rest)}")
    assert not rest and len(lora_unet) == n_unet and len(lora_clip) == len(targets) - n_unet

    # -- 2: Forge bakes it in, as a generation with <lora:sks:1> does ------------------------
    u, c = unet_patcher.clone(), clip.clone()
    loaded_keys = u.add_patches(filename=result.lora_path, patches=lora_unet, strength_patch=1.0)
    loaded_keys |= c.add_patches(filename=result.lora_path, patches=lora_clip, strength_patch=1.0)
    assert len(loaded_keys) == len(targets), "a patch found no weight"
    engine.forge_objects.unet, engine.forge_objects.clip = u, c
    engine.forge_objects_after_applying_lora = engine.forge_objects.shallow_copy()
    mm.load_models_gpu([u, c.patcher, vae.patcher])
    baked = _hashes(roots)
    loaders = [(lo.loaded_hash, sorted(lo.backup)) for lo in (unet_patcher.lora_loader, clip.patcher.lora_loader)]
    loaded = [id(lm.model) for lm in mm.current_loaded_models]
    inference = sum(p.is_inference() for r in roots for p in r.parameters())
    print(f"baked by Forge: U-Net/CLIP weights changed {baked[:2] != clean[:2]}, {len(loaders[0][1])}+"
          f"{len(loaders[1][1])} backups, {inference} parameters are inference tensors")
    assert baked[:2] != clean[:2]

    # -- 3: a training with the LoRA baked in -------------------------------------------------
    seen = {}

    def on_event(ev):
        if ev["kind"] == "loss" and not seen:
            seen["clean"] = _hashes(roots) == clean

    with forge_training_state(engine):
        again = train(dataclasses.replace(cfg, name="again"), backbone=backbone_class(engine), on_event=on_event)
    assert seen == {"clean": True}, seen
    after = [(lo.loaded_hash, sorted(lo.backup)) for lo in (unet_patcher.lora_loader, clip.patcher.lora_loader)]
    assert _hashes(roots) == baked and after == loaders and [id(lm.model) for lm in mm.current_loaded_models] == loaded
    second, _ = read_lora(again.lora_path)
    same = all(torch.equal(lora[k], second[k]) for k in lora)
    print(f"trained on clean weights: {seen['clean']}; given back bit-identical (weights, loaders, loaded list): "
          f"True; the LoRA equals the one trained without a baked LoRA: {same}")
    assert same
    mm.unload_all_models()


def main(src: str, which: str = "sd15") -> None:
    _setup(src)
    if which in ("sd15", "both"):
        check(*build_sd15())
    if which in ("sdxl", "both"):
        engine, backbone_class = build_sdxl()
        check_sdxl_conditioning(engine, backbone_class)
        check(engine, backbone_class)


if __name__ == "__main__":
    main(*sys.argv[1:3])
