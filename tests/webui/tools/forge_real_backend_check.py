"""By hand: train with ForgeBackbone on Forge's REAL `backend` classes (CPU), not the stand-in.

    python tests/webui/tools/forge_real_backend_check.py <forge src dir>

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


def main(src: str) -> None:
    sys.argv = [sys.argv[0], "--always-cpu"]  # Forge's backend.args reads the command line
    sys.path[:0] = [src, os.path.join(src, "packages_3rdparty")]
    import huggingface_guess.detection as detection
    import torch
    from backend import memory_management as mm
    from backend.diffusion_engine.base import ForgeObjects
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.operations import using_forge_operations
    from backend.patcher.clip import CLIP
    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
    from backend.patcher.unet import UnetPatcher
    from backend.patcher.vae import VAE
    from backend.state_dict import load_state_dict
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, modeling_utils

    from lib_lora.hosts.forge_backbone import ForgeBackbone, forge_training_state
    from lib_lora.training.export import read_lora
    from lib_lora.training.models import read_state_dict
    from lib_lora.training.run import train
    from lib_lora.training.tiny_model import ensure_tiny_checkpoint, sd15_configs, tiny_clip_config
    from lib_lora.training.tokenizer import load_clip_tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from webui_jobs import make_dataset, tiny_cfg

    cpu = torch.device("cpu")
    sd = read_state_dict(ensure_tiny_checkpoint())

    def part(prefix):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    # -- the model, as backend/loader.py builds it -------------------------------------------
    unet_config = detection.detect_unet_config(sd, "model.diffusion_model.")
    # SD15's unet_extra_config in huggingface_guess/model_list.py (num_heads 8 there; the tiny
    # model's own head count here: its shapes do not match SD15's entry, which needs context 768)
    from ldm_shapes import TINY_LDM_UNET_KWARGS

    unet_config.update(num_heads=TINY_LDM_UNET_KWARGS["num_heads"], num_head_channels=-1)
    for key in ("image_size", "legacy", "use_temporal_resblock", "use_temporal_attention"):
        unet_config.pop(key, None)  # detection's keys the U-Net does not take (the loader's config has none)
    with using_forge_operations(device=cpu, dtype=torch.float32, manual_cast_enabled=False):
        unet = IntegratedUNet2DConditionModel.from_config(unet_config).to(device=cpu, dtype=torch.float32)
    load_state_dict(unet, part("model.diffusion_model."))
    unet._internal_dict = unet_config  # as backend/loader.py sets it on a ConfigMixin model
    unet.storage_dtype = unet.computation_dtype = torch.float32
    unet.load_device = unet.offload_device = unet.initial_device = cpu
    with modeling_utils.no_init_weights(), using_forge_operations(device=cpu, dtype=torch.float32, manual_cast_enabled=True):
        clip_l = IntegratedCLIP(CLIPTextModel, tiny_clip_config(), add_text_projection=True).to(device=cpu, dtype=torch.float32)
    load_state_dict(clip_l, {f"transformer.{k}": v for k, v in part("cond_stage_model.transformer.").items()},
                    ignore_errors=["transformer.text_projection.weight", "transformer.text_model.embeddings.position_ids",
                                   "logit_scale"], log_name="CLIPTextModel")
    vae_config = {k: v for k, v in sd15_configs()[1].items() if not k.startswith("_")}
    with using_forge_operations(device=cpu, dtype=torch.float32):
        vae_model = IntegratedAutoencoderKL.from_config(vae_config)
    load_state_dict(vae_model, part("first_stage_model."), ignore_start="loss.")
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    from types import SimpleNamespace

    from huggingface_guess.model_list import SD15

    # the loader passes huggingface_guess's estimated config; the key map reads its repo name
    estimated = SimpleNamespace(huggingface_repo=SD15.huggingface_repo, unet_config=unet_config)
    unet_patcher = UnetPatcher.from_model(model=unet, diffusers_scheduler=scheduler, config=estimated)
    clip = CLIP(model_dict={"clip_l": clip_l}, tokenizer_dict={"clip_l": load_clip_tokenizer()})
    vae = VAE(model=vae_model)

    class Engine:  # the attributes of backend/diffusion_engine/sd15.py:StableDiffusion that we read
        is_sd1, is_sdxl, is_inpaint = True, False, False
        current_lora_hash = str([])

    engine = Engine()
    engine.forge_objects = ForgeObjects(unet=unet_patcher, clip=clip, vae=vae, clipvision=None)
    engine.forge_objects_original = engine.forge_objects.shallow_copy()
    engine.forge_objects_after_applying_lora = engine.forge_objects.shallow_copy()
    roots = [unet_patcher.model, clip.cond_stage_model, vae.first_stage_model]
    print("built from Forge's classes:", type(unet).__module__, type(unet).__name__, "|",
          type(clip_l.transformer.text_model.encoder.layers[0].self_attn.q_proj).__qualname__)

    def hashes():
        out = []
        for r in roots:
            h = hashlib.sha256()
            for k, t in sorted(r.state_dict().items()):
                h.update(k.encode())
                h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            out.append(h.hexdigest()[:16])
        return out

    clean = hashes()
    tmp = Path(tempfile.mkdtemp(prefix="forge_real_"))
    data = make_dataset(tmp)
    cfg = dataclasses.replace(tiny_cfg(data, max_steps=3), output_dir=str(tmp / "lora"), run_dir=str(tmp / "run"))

    # -- 1: a training, and Forge's key map over its file -------------------------------------
    with forge_training_state(engine):
        result = train(cfg, backbone=ForgeBackbone(engine))
    assert hashes() == clean, "weights changed by a training without baked LoRAs"
    lora, _ = read_lora(result.lora_path)
    unet_keys = model_lora_keys_unet(unet_patcher.model, {})
    clip_keys = model_lora_keys_clip(clip.cond_stage_model, {})
    lora_unet, rest = load_lora(dict(lora), unet_keys)
    lora_clip, rest = load_lora(rest, clip_keys)
    print(f"Forge's key map: {len(lora)} tensors -> {len(lora_unet)} U-Net and {len(lora_clip)} CLIP weights, "
          f"unmatched: {sorted(rest)}")
    assert not rest and len(lora_unet) == 192 and len(lora_clip) == 72

    # -- 2: Forge bakes it in, as a generation with <lora:sks:1> does ------------------------
    u, c = unet_patcher.clone(), clip.clone()
    u.add_patches(filename=result.lora_path, patches=lora_unet, strength_patch=1.0)
    c.add_patches(filename=result.lora_path, patches=lora_clip, strength_patch=1.0)
    engine.forge_objects.unet, engine.forge_objects.clip = u, c
    engine.forge_objects_after_applying_lora = engine.forge_objects.shallow_copy()
    mm.load_models_gpu([u, c.patcher, vae.patcher])
    baked = hashes()
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
            seen["clean"] = hashes() == clean

    with forge_training_state(engine):
        again = train(dataclasses.replace(cfg, name="again"), backbone=ForgeBackbone(engine), on_event=on_event)
    assert seen == {"clean": True}, seen
    after = [(lo.loaded_hash, sorted(lo.backup)) for lo in (unet_patcher.lora_loader, clip.patcher.lora_loader)]
    assert hashes() == baked and after == loaders and [id(lm.model) for lm in mm.current_loaded_models] == loaded
    second, _ = read_lora(again.lora_path)
    same = all(torch.equal(lora[k], second[k]) for k in lora)
    print(f"trained on clean weights: {seen['clean']}; given back bit-identical (weights, loaders, loaded list): "
          f"True; the LoRA equals the one trained without a baked LoRA: {same}")
    assert same


if __name__ == "__main__":
    main(sys.argv[1])
