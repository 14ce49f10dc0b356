"""Write tests/webui/forge_facts.json: facts read by `ast` from a Forge checkout's files.

    python tests/webui/tools/read_forge_facts.py <forge git dir> <commit>

Reads each file with `git show <commit>:<path>` (a bare mirror is enough). Facts only: class
bases, the `self.<name>` attributes methods set, parameter lists of the methods and functions
the stand-in (tests/webui/fake_forge) imitates, module-level names, and the pinned
requirements. Not run by the tests; rerun it to move the facts to another Forge commit.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

CLASSES = {
    "backend/patcher/base.py": ["ModelPatcher"],
    "backend/patcher/lora.py": ["LoraLoader"],
    "backend/patcher/unet.py": ["UnetPatcher"],
    "backend/patcher/clip.py": ["CLIP", "JointTextEncoder"],
    "backend/patcher/vae.py": ["VAE"],
    "backend/modules/k_model.py": ["KModel"],
    "backend/diffusion_engine/base.py": ["ForgeObjects", "ForgeDiffusionEngine"],
    "backend/diffusion_engine/sd15.py": ["StableDiffusion"],
    "backend/diffusion_engine/sdxl.py": ["StableDiffusionXL"],
    "backend/memory_management.py": ["LoadedModel"],
    "backend/nn/base.py": ["ModuleDict", "ObjectDict"],
    "backend/nn/clip.py": ["IntegratedCLIP"],
    "backend/nn/vae.py": ["IntegratedAutoencoderKL"],
    "backend/nn/unet.py": ["IntegratedUNet2DConditionModel", "TimestepEmbedSequential", "ResBlock", "Downsample",
                           "Upsample", "SpatialTransformer", "BasicTransformerBlock", "CrossAttention",
                           "FeedForward", "GEGLU", "Timestep"],
    "backend/operations.py": ["ForgeOperations"],
}
FUNCTIONS = {
    "backend/memory_management.py": ["load_models_gpu", "load_model_gpu", "unload_model_clones", "free_memory",
                                     "unload_all_models", "soft_empty_cache", "get_torch_device", "module_size"],
    "backend/patcher/lora.py": ["get_parameter_devices", "set_parameter_devices", "model_lora_keys_unet",
                                "model_lora_keys_clip"],
    "backend/operations.py": ["using_forge_operations"],
    "backend/nn/unet.py": ["timestep_embedding"],
    "extensions-builtin/sd_forge_lora/networks.py": ["list_available_networks", "load_networks",
                                                      "load_lora_for_models"],
    "modules/call_queue.py": ["wrap_gradio_gpu_call"],
}
MODULE_NAMES = {
    "backend/memory_management.py": ["current_loaded_models"],
    "modules/call_queue.py": ["queue_lock"],
}


def show(git_dir: str, commit: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"{commit}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def params(fn: ast.FunctionDef) -> list[dict]:
    a = fn.args
    out = []
    positional = a.posonlyargs + a.args
    n_defaults = len(a.defaults)
    for i, arg in enumerate(positional):
        out.append({"name": arg.arg, "kind": "POSITIONAL_OR_KEYWORD", "has_default": i >= len(positional) - n_defaults})
    if a.vararg:
        out.append({"name": a.vararg.arg, "kind": "VAR_POSITIONAL", "has_default": False})
    for arg, d in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        out.append({"name": arg.arg, "kind": "KEYWORD_ONLY", "has_default": d is not None})
    if a.kwarg:
        out.append({"name": a.kwarg.arg, "kind": "VAR_KEYWORD", "has_default": False})
    return out


def self_attributes(node: ast.AST) -> list[str]:
    names = []
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and isinstance(n.value, ast.Name) \
                and n.value.id == "self" and n.attr not in names:
            names.append(n.attr)
    return names


def class_facts(cls: ast.ClassDef, src: str) -> dict:
    methods = {f.name: params(f) for f in cls.body if isinstance(f, ast.FunctionDef)}
    init = next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
    facts = {
        "bases": [ast.get_source_segment(src, b) for b in cls.bases],
        "init_self_attributes": self_attributes(init) if init is not None else [],
        "self_attributes": self_attributes(cls),
        "class_attributes": [t.id for s in cls.body if isinstance(s, ast.Assign) for t in s.targets
                             if isinstance(t, ast.Name)],
        "methods": methods,
        "decorators": {f.name: [ast.get_source_segment(src, d) for d in f.decorator_list]
                       for f in cls.body if isinstance(f, ast.FunctionDef) and f.decorator_list},
    }
    nested = {c.name: class_facts(c, src) for c in cls.body if isinstance(c, ast.ClassDef)}
    if nested:
        facts["classes"] = nested
    return facts


def requirements(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        pins[name.strip()] = version.strip()
    return pins


def _call_kwargs(call: ast.Call, src: str) -> dict[str, str]:
    return {k.arg: ast.get_source_segment(src, k.value) for k in call.keywords if k.arg}


def sdxl_facts(src: str, loader: str) -> dict:
    """What StableDiffusionXL builds and how get_learned_conditioning makes the U-Net's inputs:
    CLIP's model_dict keys, the two text engines' settings, the embedder, the order of the six
    values it embeds, and the crossattn and vector concatenations; and how backend/loader.py
    builds a CLIP text encoder."""
    tree = ast.parse(src)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "StableDiffusionXL")
    init = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    cond = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "get_learned_conditioning")
    clip_call = next(n for n in ast.walk(init) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "CLIP")
    engines = {}
    for n in ast.walk(init):
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call) and isinstance(n.targets[0], ast.Attribute):
            name = n.targets[0].attr
            if name.startswith("text_processing_engine_") or name == "embedder":
                engines[name] = {"call": ast.get_source_segment(src, n.value.func), **_call_kwargs(n.value, src)}
                if name == "embedder":
                    engines[name]["args"] = [ast.get_source_segment(src, a) for a in n.value.args]
    embedded = [ast.get_source_segment(src, c.args[0].args[0].elts[0]) for c in ast.walk(cond)
                if isinstance(c, ast.Call) and ast.get_source_segment(src, c.func) == "self.embedder"]
    out = next(n for n in ast.walk(cond) if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "cond")
    return {
        "clip_model_dict_keys": [k.value for k in clip_call.keywords[0].value.keys],
        "clip_tokenizer_dict_keys": [k.value for k in clip_call.keywords[1].value.keys],
        "init": engines,
        "embedder_inputs": embedded,  # the order of the six values in `flat`
        "cond": _call_kwargs(out.value, src),
        "loader_text_encoder": "IntegratedCLIP(CLIPTextModel, config, add_text_projection=True)" in loader,
    }


def main(git_dir: str, commit: str) -> None:
    full = subprocess.run(["git", "--git-dir", git_dir, "rev-parse", commit], check=True, capture_output=True,
                          text=True).stdout.strip()
    facts: dict = {
        "source": {"repo": "lllyasviel/stable-diffusion-webui-forge", "commit": full,
                   "read_from": "mirror github:lllyasviel/stable-diffusion-webui-forge (git show <commit>:<path>)"},
        "note": "Facts only, written by tests/webui/tools/read_forge_facts.py; not to be edited by hand.",
        "classes": {}, "functions": {}, "module_names": {}, "decorated_functions": {},
    }
    paths = sorted(set(CLASSES) | set(FUNCTIONS) | set(MODULE_NAMES))
    for path in paths:
        src = show(git_dir, commit, path)
        tree = ast.parse(src)
        top = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef | ast.FunctionDef)}
        for name in CLASSES.get(path, []):
            facts["classes"][f"{path}:{name}"] = class_facts(top[name], src)
        for name in FUNCTIONS.get(path, []):
            fn = top[name]
            facts["functions"][f"{path}:{name}"] = params(fn)
            if fn.decorator_list:
                facts["decorated_functions"][f"{path}:{name}"] = [ast.get_source_segment(src, d) for d in fn.decorator_list]
        assigned = {t.id for s in tree.body if isinstance(s, ast.Assign) for t in s.targets if isinstance(t, ast.Name)}
        for name in MODULE_NAMES.get(path, []):
            facts["module_names"][f"{path}:{name}"] = name in assigned
    # what SD1.5's engine passes to CLIP(...) and how Forge's LoRA list finds its folder
    sd15 = show(git_dir, commit, "backend/diffusion_engine/sd15.py")
    facts["sd15_clip_model_dict_keys"] = sorted({k.value for n in ast.walk(ast.parse(sd15)) if isinstance(n, ast.Dict)
                                                  for k in n.keys if isinstance(k, ast.Constant)})
    facts["sdxl"] = sdxl_facts(show(git_dir, commit, "backend/diffusion_engine/sdxl.py"),
                               show(git_dir, commit, "backend/loader.py"))
    preload = show(git_dir, commit, "extensions-builtin/sd_forge_lora/preload.py")
    facts["lora_dir_argument"] = {"flag": "--lora-dir", "default": "os.path.join(paths.models_path, 'Lora')",
                                  "present": "--lora-dir" in preload and "'Lora'" in preload}
    comfy = show(git_dir, commit, "packages_3rdparty/comfyui_lora_collection/lora.py")
    facts["unet_key_map_rules"] = {
        "compvis": 'key_map["lora_unet_{}".format(key_lora)] = k' in comfy,
        "diffusers": "diffusers_keys = utils.unet_to_diffusers(model.diffusion_model.config)" in comfy,
        "text_encoder_sd1": 'text_model_lora_key = "lora_te_text_model_encoder_layers_{}_{}"' in comfy
        and '"clip_l.transformer.text_model.encoder.layers.{}.{}.weight"' in comfy,
    }
    facts["sdxl_key_map_rules"] = {
        # lora_te1_ onto clip_l, lora_te2_ onto clip_g when clip_l is there (SDXL base), and the
        # U-Net's lora_unet_<ldm path> (the "compvis" rule above) for kohya's SDXL names
        "te1_on_clip_l": '"lora_te1_text_model_encoder_layers_{}_{}".format(b, LORA_CLIP_MAP[c]) #SDXL base' in comfy,
        "te2_on_clip_g": 'k = "clip_g.transformer.text_model.encoder.layers.{}.{}.weight".format(b, c)' in comfy
        and '"lora_te2_text_model_encoder_layers_{}_{}".format(b, LORA_CLIP_MAP[c]) #SDXL base' in comfy
        and "if clip_l_present:" in comfy,
        "lora_clip_map": sorted(ast.literal_eval(comfy.split("LORA_CLIP_MAP = ", 1)[1].split("}", 1)[0] + "}").items()),
    }
    facts["requirements_versions"] = requirements(show(git_dir, commit, "requirements_versions.txt"))
    out = Path(__file__).resolve().parents[1] / "forge_facts.json"
    out.write_text(json.dumps(facts, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
