"""The Forge stand-in (tests/webui/fake_forge) against facts read from Forge's source.

tests/webui/forge_facts.json records, from lllyasviel/stable-diffusion-webui-forge at the commit
it names, for each Forge class and function the stand-in imitates: its bases, the `self.<name>`
attributes its methods set, the parameter lists of its methods, decorators, module-level names,
SD1.5's CLIP key, SDXL's engine (its CLIP keys, text engines' settings, embedder and the
crossattn/vector it builds), the LoRA folder flag, the LoRA key-map rules (SD1.5's and SDXL's)
and `requirements_versions.txt`.
It was written by tests/webui/tools/read_forge_facts.py (an `ast` pass over the real files).

The checks run one way: everything the stand-in defines (each method of its own, each instance
attribute it sets) must exist in Forge with the same name and parameter list, so code tested
against the stand-in only uses what Forge has.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
FACTS = json.loads((HERE / "forge_facts.json").read_text(encoding="utf-8"))
COMMIT = "dfdcbab685e57677014f05a3309b48cc87383167"

# stand-in "module:Class" -> Forge's fact key (the same path and name)
CLASSES = [
    "backend/patcher/base.py:ModelPatcher", "backend/patcher/lora.py:LoraLoader", "backend/patcher/unet.py:UnetPatcher",
    "backend/patcher/clip.py:CLIP", "backend/patcher/clip.py:JointTextEncoder", "backend/patcher/vae.py:VAE",
    "backend/modules/k_model.py:KModel", "backend/diffusion_engine/base.py:ForgeObjects",
    "backend/diffusion_engine/base.py:ForgeDiffusionEngine", "backend/diffusion_engine/sd15.py:StableDiffusion",
    "backend/diffusion_engine/sdxl.py:StableDiffusionXL", "backend/nn/unet.py:Timestep",
    "backend/memory_management.py:LoadedModel", "backend/nn/base.py:ModuleDict", "backend/nn/base.py:ObjectDict",
    "backend/nn/clip.py:IntegratedCLIP", "backend/nn/vae.py:IntegratedAutoencoderKL",
    "backend/nn/unet.py:IntegratedUNet2DConditionModel",
]
# Deviations, each with its reason; the checks skip exactly these.
SIGNATURE_DEVIATIONS = {
    "IntegratedAutoencoderKL.__init__": "built from ldm's AutoencoderKL tree instead of a diffusers config",
    "IntegratedUNet2DConditionModel.__init__": "ldm's UNetModel constructor (its kwargs; the sgm stand-in's for SDXL), "
                                               "then Forge's in-place blocks",
}
# Set on a module by another class: ModelPatcher.__init__ gives the model it wraps a `lora_loader`.
SET_FROM_OUTSIDE = {"lora_loader": "backend/patcher/base.py:ModelPatcher"}
FUNCTIONS = [
    "backend/memory_management.py:load_models_gpu", "backend/memory_management.py:load_model_gpu",
    "backend/memory_management.py:unload_model_clones", "backend/memory_management.py:free_memory",
    "backend/memory_management.py:unload_all_models", "backend/memory_management.py:soft_empty_cache",
    "backend/memory_management.py:get_torch_device", "backend/memory_management.py:module_size",
    "backend/patcher/lora.py:get_parameter_devices", "backend/patcher/lora.py:set_parameter_devices",
    "backend/operations.py:using_forge_operations", "backend/nn/unet.py:timestep_embedding",
]


def _module_name(path: str) -> str:
    return path[: -len(".py")].replace("/", ".")


def _stand_in(key: str):
    import importlib

    path, name = key.split(":")
    return getattr(importlib.import_module(_module_name(path)), name)


def _params(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()]


@pytest.fixture
def engine(forge):
    return forge.shared.sd_model


def test_the_facts_name_their_source():
    assert FACTS["source"]["repo"] == "lllyasviel/stable-diffusion-webui-forge"
    assert FACTS["source"]["commit"] == COMMIT


@pytest.mark.parametrize("key", CLASSES)
def test_every_stand_in_method_is_forges_with_its_parameters(forge_backend, key):
    cls = _stand_in(key)
    real = FACTS["classes"][key]["methods"]
    own = [n for n, v in vars(cls).items() if inspect.isfunction(v) or isinstance(v, classmethod)]
    assert own or not real, key
    for name in own:
        if f"{cls.__name__}.{name}" in SIGNATURE_DEVIATIONS:
            continue
        assert name in real, f"{key}.{name} is not a method of Forge's class"
        fn = vars(cls)[name]
        fn = fn.__func__ if isinstance(fn, classmethod) else fn  # with its `cls`, as the source lists it
        assert _params(fn) == [p["name"] for p in real[name]], f"{key}.{name}"


def _instances(engine) -> dict[str, object]:
    import backend.memory_management as mm

    objs = engine.forge_objects
    return {
        "backend/diffusion_engine/sd15.py:StableDiffusion": engine,
        "backend/diffusion_engine/base.py:ForgeObjects": objs,
        "backend/patcher/unet.py:UnetPatcher": objs.unet,
        "backend/patcher/base.py:ModelPatcher": objs.clip.patcher,
        "backend/patcher/lora.py:LoraLoader": objs.unet.lora_loader,
        "backend/patcher/clip.py:CLIP": objs.clip,
        "backend/patcher/vae.py:VAE": objs.vae,
        "backend/modules/k_model.py:KModel": objs.unet.model,
        "backend/nn/clip.py:IntegratedCLIP": objs.clip.cond_stage_model.clip_l,
        "backend/nn/vae.py:IntegratedAutoencoderKL": objs.vae.first_stage_model,
        "backend/memory_management.py:LoadedModel": mm.LoadedModel(objs.vae.patcher),
    }


def _source_text(key: str) -> str:
    """The facts say which attributes a class sets on itself; for one set on another object the
    stand-in's own source of that class is checked to be where it happens."""
    return inspect.getsource(_stand_in(key))


def _real_attributes(key: str) -> set[str]:
    facts = FACTS["classes"][key]
    names = set(facts["self_attributes"]) | set(facts["class_attributes"])
    for base in facts["bases"]:  # a base defined in the facts (UnetPatcher -> ModelPatcher...)
        for other in FACTS["classes"]:
            if other.endswith(f":{base}"):
                names |= _real_attributes(other)
    return names


def _check_attributes(instances: dict[str, object]) -> None:
    """Every attribute each stand-in object sets is one the Forge class its key names sets."""
    for key, obj in instances.items():
        real = _real_attributes(key) | {n for n, where in SET_FROM_OUTSIDE.items() if f"model.{n}" in _source_text(where)}
        if key.endswith(":StableDiffusionXL"):  # its base's too (ForgeDiffusionEngine is not named by its path)
            real |= _real_attributes("backend/diffusion_engine/base.py:ForgeDiffusionEngine")
        ours = {n for n in vars(obj) if not n.startswith("_") and n != "training"}
        if isinstance(obj, torch.nn.Module):
            ours |= set(obj._modules) | {n for n, p in obj._parameters.items() if p is not None}
        assert ours - real == set(), f"{key}: {sorted(ours - real)} are not attributes Forge sets"


def _check_unet_tree(unet: torch.nn.Module) -> None:
    """Forge's U-Net class, and each child of each module of a class Forge's unet.py defines is one it has."""
    assert type(unet).__name__ == "IntegratedUNet2DConditionModel"
    unet_facts = {k.split(":")[1]: v for k, v in FACTS["classes"].items() if k.startswith("backend/nn/unet.py:")}
    seen = set()
    for module in unet.modules():
        cls = type(module).__name__
        if cls not in unet_facts:
            continue
        seen.add(cls)
        for child in module._modules:
            if not child.isdigit():
                assert child in unet_facts[cls]["init_self_attributes"], f"{cls}.{child} is not a child Forge's {cls} has"
    assert {"IntegratedUNet2DConditionModel", "SpatialTransformer", "BasicTransformerBlock", "CrossAttention",
            "FeedForward", "GEGLU", "ResBlock", "Downsample", "Upsample"} <= seen


def test_every_attribute_the_stand_ins_set_is_forges(engine):
    _check_attributes(_instances(engine))


def test_the_u_net_is_forges_module_tree(engine):
    unet = engine.forge_objects.unet.model.diffusion_model
    _check_unet_tree(unet)
    forward = FACTS["classes"]["backend/nn/unet.py:IntegratedUNet2DConditionModel"]["methods"]["forward"]
    assert _params(type(unet).forward) == [p["name"] for p in forward]


def test_forges_layers_are_its_own_linear_and_an_nn_conv2d(engine):
    from backend.operations import ForgeOperations

    ops = FACTS["classes"]["backend/operations.py:ForgeOperations"]["classes"]
    assert ops["Linear"]["bases"] == ["torch.nn.Module"] and ops["Conv2d"]["bases"] == ["torch.nn.Conv2d"]
    assert not issubclass(ForgeOperations.Linear, torch.nn.Linear) and issubclass(ForgeOperations.Conv2d, torch.nn.Conv2d)
    for name in ("Linear", "Conv2d"):
        for method in ("__init__", "forward"):
            assert _params(getattr(getattr(ForgeOperations, name), method)) == \
                [p["name"] for p in ops[name]["methods"][method]], f"{name}.{method}"
    linear = next(m for m in engine.forge_objects.unet.model.modules() if type(m).__name__ == "Linear")
    assert {n for n in vars(linear) if not n.startswith("_") and n != "training"} | set(linear._parameters) \
        <= set(ops["Linear"]["init_self_attributes"])
    te = engine.forge_objects.clip.cond_stage_model.clip_l.transformer
    assert type(te.text_model.encoder.layers[0].self_attn.q_proj) is ForgeOperations.Linear  # built as Forge's loader does


@pytest.mark.parametrize("key", FUNCTIONS)
def test_functions_have_forges_parameters(forge_backend, key):
    fn = _stand_in(key)
    assert _params(fn) == [p["name"] for p in FACTS["functions"][key]], key


def test_module_names_and_decorators(forge_backend):
    import backend.memory_management as mm
    from backend.diffusion_engine.sd15 import StableDiffusion
    from backend.patcher.lora import LoraLoader

    assert FACTS["module_names"]["backend/memory_management.py:current_loaded_models"]
    assert isinstance(mm.current_loaded_models, list)
    # Forge bakes LoRAs and encodes in inference mode; the stand-in does so too (hence inference tensors)
    assert FACTS["classes"]["backend/patcher/lora.py:LoraLoader"]["decorators"]["refresh"] == ["torch.inference_mode()"]
    assert FACTS["classes"]["backend/diffusion_engine/sd15.py:StableDiffusion"]["decorators"]["encode_first_stage"] \
        == ["torch.inference_mode()"]
    for fn in (LoraLoader.refresh, StableDiffusion.encode_first_stage, StableDiffusion.decode_first_stage):
        assert "inference_mode" in inspect.getsource(fn).split("def ")[0]


def test_sd15_clip_key_lora_folder_and_key_map_rules(engine):
    assert FACTS["sd15_clip_model_dict_keys"] == ["clip_l"]
    assert hasattr(engine.forge_objects.clip.cond_stage_model, "clip_l") and hasattr(engine.forge_objects.clip.tokenizer, "clip_l")
    assert FACTS["lora_dir_argument"]["present"] and FACTS["lora_dir_argument"]["flag"] == "--lora-dir"
    # Forge's key map (ComfyUI's): lora_unet_<diffusers path> onto its compvis U-Net, lora_te_ onto clip_l
    assert all(FACTS["unet_key_map_rules"].values())


def test_forges_pins_are_recorded():
    pins = FACTS["requirements_versions"]
    assert pins["gradio"].startswith("4.") and pins["transformers"] == "4.46.1" and pins["diffusers"] == "0.31.0"
    assert pins["torch"] == ""  # unpinned in the file: Forge's launcher installs torch itself


# --------------------------------------------------------------------------------------------
# SDXL: backend/diffusion_engine/sdxl.py's StableDiffusionXL


@pytest.fixture
def engine_xl(forge_xl):
    return forge_xl.shared.sd_model


def _instances_xl(engine) -> dict[str, object]:
    objs = engine.forge_objects
    return {
        "backend/diffusion_engine/sdxl.py:StableDiffusionXL": engine,
        "backend/patcher/clip.py:CLIP": objs.clip,
        "backend/nn/clip.py:IntegratedCLIP": objs.clip.cond_stage_model.clip_g,
        "backend/nn/unet.py:Timestep": engine.embedder,
        "backend/modules/k_model.py:KModel": objs.unet.model,
    }


def test_every_attribute_the_sdxl_stand_ins_set_is_forges(engine_xl):
    _check_attributes(_instances_xl(engine_xl))


def test_the_sdxl_u_net_is_forges_module_tree(engine_xl):
    unet = engine_xl.forge_objects.unet.model.diffusion_model
    _check_unet_tree(unet)
    assert "label_emb" in unet._modules  # SDXL's `y` (Forge's num_classes "sequential")


def test_sdxl_engine_parts_and_conditioning_are_forges(engine_xl):
    """What ForgeSDXLBackbone relies on: CLIP holds clip_l and clip_g (both IntegratedCLIP over
    transformers' CLIPTextModel with a text_projection Linear, as backend/loader.py builds them),
    the U-Net's context is both encoders' penultimate hidden states (clip_skip 2, no final norm)
    l then g, `vector` is clip_g's projected pooled output then `embedder` (a Timestep) over
    the six values in the order of our time ids (original h, w, crop top, left, target h, w)."""
    from backend.nn.unet import Timestep

    xl = FACTS["sdxl"]
    assert xl["clip_model_dict_keys"] == xl["clip_tokenizer_dict_keys"] == ["clip_l", "clip_g"]
    te = engine_xl.forge_objects.clip.cond_stage_model
    assert list(te._modules) == ["clip_l", "clip_g"] and xl["loader_text_encoder"]
    assert all(hasattr(te._modules[k].transformer, "text_projection") for k in ("clip_l", "clip_g"))
    engines = xl["init"]
    for name, key in (("text_processing_engine_l", "clip_l"), ("text_processing_engine_g", "clip_g")):
        e = engines[name]
        assert e["text_encoder"] == f"clip.cond_stage_model.{key}" and e["tokenizer"] == f"clip.tokenizer.{key}"
        assert (e["clip_skip"], e["minimal_clip_skip"], e["final_layer_norm"]) == ("2", "2", "False")
    assert (engines["text_processing_engine_g"]["return_pooled"], engines["text_processing_engine_g"]["text_projection"]) \
        == ("True", "True")
    assert engines["embedder"] == {"call": "Timestep", "args": ["256"]} and isinstance(engine_xl.embedder, Timestep)
    assert xl["embedder_inputs"] == ["height", "width", "crop_h", "crop_w", "target_height", "target_width"]
    assert xl["cond"] == {"crossattn": "torch.cat([cond_l, cond_g], dim=2)", "vector": "torch.cat([clip_pooled, flat], dim=1)"}
    assert FACTS["classes"]["backend/diffusion_engine/sdxl.py:StableDiffusionXL"]["decorators"]["encode_first_stage"] \
        == ["torch.inference_mode()"]


def test_sdxl_key_map_rules(engine_xl):
    """Forge's map for kohya's SDXL names: lora_unet_<ldm path> (the compvis rule), lora_te1_ onto
    clip_l, lora_te2_ onto clip_g; tests/comfy_helpers.py's port has the same CLIP map."""
    import comfy_helpers

    rules = FACTS["sdxl_key_map_rules"]
    assert rules["te1_on_clip_l"] and rules["te2_on_clip_g"] and FACTS["unet_key_map_rules"]["compvis"]
    assert [tuple(p) for p in rules["lora_clip_map"]] == sorted(comfy_helpers.LORA_CLIP_MAP.items())
