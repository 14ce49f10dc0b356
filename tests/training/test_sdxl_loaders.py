"""An SDXL LoRA file of ours loads with every key matched in the loaders people use.

The file is built as export builds it: a LoRANetwork over the tiny-sdxl backbone's targets,
non-zero up weights, written by `export.write_lora` with `build_metadata(family=SDXL)`.
Each loader's key matching is checked against its public source (commit named per test):
diffusers is run itself; the WebUI's, ComfyUI's/Forge's and kohya's matching is reimplemented
here, step by step, over the module names of the real layouts (the tiny-sdxl single file's keys
are sgm's module tree; ComfyUI and Forge hold the text encoders in the HF layout).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from comfy_helpers import model_lora_keys_clip, model_lora_keys_unet, unet_config_from_keys
from lora_helpers import change_against_merged, merge_diffusers_lora, randomize_lora
from PIL import Image

from lib_lora.config import TrainConfig
from lib_lora.training import data
from lib_lora.training.export import read_lora, write_lora
from lib_lora.training.family import SDXL
from lib_lora.training.lora import LoRANetwork
from lib_lora.training.metadata import RunInfo, build_metadata


@pytest.fixture(scope="module")
def sdxl():
    from lib_lora.training.models_sdxl import load_backbone

    return load_backbone("tiny-sdxl")


@pytest.fixture(scope="module")
def sgm_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the tiny-sdxl single file (the sgm DiffusionEngine's state dict)."""
    from safetensors import safe_open

    from lib_lora.training.tiny_model import ensure_tiny_checkpoint

    with safe_open(str(ensure_tiny_checkpoint(family="sdxl")), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _metadata(tmp_path: Path, conv_dim: int, **kw) -> dict[str, str]:
    sub = tmp_path / "ds" / "2_tok"
    sub.mkdir(parents=True)
    Image.new("RGB", (64, 64), (120, 60, 30)).save(sub / "a.png")
    (sub / "a.txt").write_text("tok", encoding="utf-8")
    cfg = TrainConfig(name="sdxl_lora", dataset=str(tmp_path / "ds"), output_dir=str(tmp_path / "out"),
                      run_dir=str(tmp_path / "run"), resolution=64, min_bucket_reso=64, max_bucket_reso=128,
                      dim=4, alpha=2.0, conv_dim=conv_dim, conv_alpha=1.0, device="cpu", max_steps=1,
                      train_text_encoder=True, **kw)
    plan = data.scan_dataset(tmp_path / "ds", cfg).plan
    run = RunInfo(started_at=1_700_000_000.0, unet_lr=1e-4, text_encoder_lr=1e-5, optimizer="torch.optim.adamw.AdamW",
                  optimizer_args="", mixed_precision="no", model_name="tiny-sdxl", model_hash="", session_id="1")
    return build_metadata(cfg, plan, run, family=SDXL)


@pytest.fixture(scope="module", params=[0, 2], ids=["linear", "conv"])
def lora(request, sdxl, tmp_path_factory):
    """(network, path of its file): the U-Net and both text encoders, 3x3 convs too with conv_dim 2."""
    conv_dim = request.param
    torch.manual_seed(0)
    network = LoRANetwork(sdxl.lora_targets(conv=bool(conv_dim)), dim=4, alpha=2, conv_dim=conv_dim, conv_alpha=1)
    randomize_lora(network)
    tmp = tmp_path_factory.mktemp("sdxl_lora")
    path = write_lora(tmp / "sdxl_lora.safetensors", network.state_dict_kohya(), _metadata(tmp, conv_dim), dtype=torch.float32)
    return network, path


def _lora_names(path: Path) -> set[str]:
    tensors, _ = read_lora(path)
    names = {k.split(".", 1)[0] for k in tensors}
    for name in names:  # a kohya LoRA module is exactly these three tensors
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= tensors.keys()
    assert len(tensors) == 3 * len(names)
    return names


def _modules(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, str]:
    """Module path (under `prefix`) -> torch class, as the layout's state dict implies it:
    a 2-d `.weight` is a Linear, 4-d a Conv2d, `in_proj_weight` an nn.MultiheadAttention,
    every parent path a container."""
    out: dict[str, str] = {}
    for key, shape in shapes.items():
        if not key.startswith(prefix):
            continue
        path, _, param = key[len(prefix):].rpartition(".")
        if param == "in_proj_weight":
            out[path] = "MultiheadAttention"
        elif param == "weight" and len(shape) in (2, 4):
            out[path] = "Linear" if len(shape) == 2 else "Conv2d"
        elif param == "weight":
            out.setdefault(path, "Norm")
        parts = path.split(".")
        for i in range(1, len(parts)):
            out.setdefault(".".join(parts[:i]), "Module")
    out.setdefault("", "Module")
    return out


# ---- diffusers ------------------------------------------------------------------------------

def test_diffusers_reads_our_sdxl_file_and_the_unet_changes_as_ours(lora, sdxl):
    """diffusers 0.31 `StableDiffusionXLLoraLoaderMixin.lora_state_dict` with the U-Net config, as
    `load_lora_weights` calls it (sgm blocks -> diffusers blocks, then the kohya conversion in
    loaders/lora_conversion_utils.py, which raises for any key it could not rename). Applying
    needs diffusers' PEFT backend (transformers > 4.33; the WebUI pins 4.30.2), so the converted
    weights are merged by the standard rule W += up @ down * alpha / rank."""
    from diffusers import StableDiffusionXLPipeline

    from lib_lora.training.models_sdxl import load_backbone

    network, path = lora
    state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path.parent), weight_name=path.name,
                                                                unet_config=sdxl.unet.config)
    assert len(state_dict) == 2 * len(network.loras)  # every module renamed, none dropped
    fresh = load_backbone("tiny-sdxl")
    merged = merge_diffusers_lora({"unet": fresh.unet, "text_encoder": fresh.text_encoder,
                                   "text_encoder_2": fresh.text_encoder_2}, state_dict, alphas)
    assert merged == len(network.loras)

    gen = torch.Generator().manual_seed(3)
    ids = sdxl.tokenizer(["zhangnaying, 1girl, smile"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    lat = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 900])
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)

    def eps(backbone):
        cond = backbone.encode_text(ids)
        added = {"text_embeds": cond.pooled.expand(2, -1), "time_ids": time_ids}
        return cond.cond, backbone.predict_noise(lat, t, cond.cond.expand(2, -1, -1), added)

    with torch.no_grad():
        base_cond, base_eps = eps(sdxl)
        network.apply()
        try:
            ours_cond, ours_eps = eps(sdxl)
        finally:
            network.remove()
        theirs_cond, theirs_eps = eps(fresh)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(ours_cond, base_cond) > 1e-2 and rel(ours_eps, base_eps) > 1e-2  # the LoRA does something
    # Merged (W + dW) x vs. ours W x + up(down x): the same sums in another order, in float32
    # (eps 1.2e-7) over a few dozen layers of tiny width; each layer's rounding is ~1e-6
    # relative, so 1e-4 leaves two orders of magnitude and still fails on any wrong key or scale.
    assert rel(theirs_cond, ours_cond) <= 1e-4
    assert rel(theirs_eps, ours_eps) <= 1e-4


# ---- the WebUI v1.10.1's Lora extension -------------------------------------------------------
# AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 82a973c04367123ae98bd9abdf80d9eda9b910e2),
# extensions-builtin/Lora/networks.py: `assign_network_names_to_compvis_modules` names sgm's
# modules `diffusion_model_<path>` (sd_model.model.named_modules) and `<i>_<path>` for each
# conditioner embedder's `wrapped` model (modules/sd_hijack.py wraps embedders 0 and 1, and the
# wrapped model is sgm's FrozenCLIPEmbedder / FrozenOpenCLIPEmbedder2); `load_network` tries
# `convert_diffusers_name_to_compvis`, then a `_[qkv]_proj` suffix stripped (re_x_proj), then
# lora_unet -> diffusion_model and lora_te1_text_model -> 0_transformer_text_model.
# network_lora.py accepts Linear, Conv2d and MultiheadAttention modules, and networks.py
# `network_apply_weights` applies a MultiheadAttention's LoRA only when q, k, v and out are all there.

_WEBUI_PREFIXES = {"model.diffusion_model.": "diffusion_model_", "conditioner.embedders.0.": "0_",
                   "conditioner.embedders.1.": "1_"}


def _webui_layer_mapping(sgm_shapes) -> dict[str, str]:
    mapping = {}
    for prefix, name_prefix in _WEBUI_PREFIXES.items():
        for path, cls in _modules(sgm_shapes, prefix).items():
            mapping[name_prefix + path.replace(".", "_")] = cls
    return mapping


def _webui_convert_diffusers_name_to_compvis(key: str) -> str:
    """The branches of networks.py `convert_diffusers_name_to_compvis` an SDXL file can reach:
    the SD1.5 diffusers-name patterns (none of which an sgm-named key matches: checked) and TE2's."""
    sd15 = (r"lora_unet_conv_in(.*)", r"lora_unet_conv_out(.*)", r"lora_unet_time_embedding_linear_(\d+)(.*)",
            r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
            r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
            r"lora_te_text_model_encoder_layers_(\d+)_(.+)")
    assert not any(re.match(p, key) for p in sd15), f"{key} would be read as an SD1.5 diffusers name"
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        layer, rest = m[1], m[2]
        if "mlp_fc1" in rest:
            return f"1_model_transformer_resblocks_{layer}_{rest.replace('mlp_fc1', 'mlp_c_fc')}"
        if "mlp_fc2" in rest:
            return f"1_model_transformer_resblocks_{layer}_{rest.replace('mlp_fc2', 'mlp_c_proj')}"
        return f"1_model_transformer_resblocks_{layer}_{rest.replace('self_attn', 'attn')}"
    return key


def _webui_load_network(names, mapping) -> tuple[dict[str, str], dict[str, str]]:
    """networks.py `load_network`'s matching: (lora name -> matched module's class, unmatched)."""
    matched, failed = {}, {}
    for name in names:
        key = _webui_convert_diffusers_name_to_compvis(name)
        cls = mapping.get(key)
        if cls is None and (m := re.match(r"(.*)_([qkv]_proj)$", key)):
            cls = mapping.get(m[1])
        if cls is None and "lora_unet" in name:
            key = name.replace("lora_unet", "diffusion_model")
            cls = mapping.get(key)
        elif cls is None and "lora_te1_text_model" in name:
            key = name.replace("lora_te1_text_model", "0_transformer_text_model")
            cls = mapping.get(key)
        if cls is None:
            failed[name] = key
        else:
            matched[key] = cls
    return matched, failed


def test_the_webui_lora_extension_matches_every_key(lora, sgm_shapes):
    _, path = lora
    names = _lora_names(path)
    mapping = _webui_layer_mapping(sgm_shapes)
    matched, failed = _webui_load_network(names, mapping)
    assert failed == {}
    assert len(matched) == len(names)
    # network_lora.py: a LoRA on any other module type raises "unsupported type"
    assert {cls for cls in matched.values()} <= {"Linear", "Conv2d", "MultiheadAttention"}
    # TE2's fused attention: the WebUI applies it only with all four of q, k, v and out
    attns = {k.rsplit("_", 2)[0] for k, cls in matched.items() if cls == "MultiheadAttention"}
    te2_layers = {p for p, c in mapping.items() if c == "MultiheadAttention"}
    assert attns == te2_layers  # the file trains TE2 here: every OpenCLIP attention is hit
    for attn in attns:
        assert {f"{attn}_{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")} <= matched.keys()


# ---- ComfyUI and Forge --------------------------------------------------------------------
# Their key mapping is re-written in tests/comfy_helpers.py (sources and commits there):
# `model_lora_keys_unet` maps `lora_unet_<path _-joined>` for every `diffusion_model.<path>.weight`
# of the (ldm-layout) U-Net; `model_lora_keys_clip` maps `lora_te1_…` to `clip_l.transformer.…`
# and, when clip_l is present, `lora_te2_…` to `clip_g.…` (both encoders in the HF layout;
# `load_lora` warns "lora key not loaded" for the rest). Forge calls the same functions, copied in
# packages_3rdparty/comfyui_lora_collection/lora.py, over its IntegratedUNet2DConditionModel (ldm
# names) and HF CLIP encoders.

def test_comfyui_and_forge_match_every_key(lora, sdxl, sgm_shapes):
    _, path = lora
    names = _lora_names(path)
    unet_keys = {k[len("model."):] for k in sgm_shapes if k.startswith("model.diffusion_model.")}
    clip_keys = {f"clip_l.transformer.{k}" for k in sdxl.text_encoder.state_dict()}
    clip_keys |= {f"clip_g.transformer.{k}" for k in sdxl.text_encoder_2.state_dict()}
    key_map = model_lora_keys_clip(clip_keys, model_lora_keys_unet(unet_keys, unet_config_from_keys(unet_keys)))
    assert sorted(names - key_map.keys()) == []  # load_lora: "lora key not loaded" for each of these
    # every LoRA lands on a weight of its own shape's rank (a Linear or a conv)
    for name in names:
        target = key_map[name]
        shape = sgm_shapes.get("model." + target) if target.startswith("diffusion_model.") else None
        assert shape is None or len(shape) in (2, 4), target


# ---- kohya's sd-scripts ---------------------------------------------------------------------
# kohya-ss/sd-scripts (commit 48d368fa557731ad0488c07304dfeba8c07910eb) networks/lora.py
# `create_network_from_weights` -> LoRANetwork.create_modules: inside every module whose class is
# in UNET_TARGET_REPLACE_MODULE ("Transformer2DModel") or, with conv LoRA,
# UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 ("ResnetBlock2D", "Downsample2D", "Upsample2D"), each
# Linear/Conv2d child is `lora_unet_<path>` with . -> _; text encoders (HF CLIPTextModel /
# CLIPTextModelWithProjection) `lora_te1_` / `lora_te2_` inside CLIPAttention/CLIPSdpaAttention/
# CLIPMLP. The U-Net is library/sdxl_original_unet.py, whose module tree is sgm's: its
# Transformer2DModel is sgm's SpatialTransformer (`<block>.<i>` holding proj_in / proj_out /
# transformer_blocks), ResnetBlock2D sgm's ResBlock (in_layers, emb_layers, out_layers,
# skip_connection), Downsample2D holds `op`, Upsample2D `conv`. load_weights then loads with
# strict=False: a file name it did not create is silently unused.


def _kohya_unet_container(path: str) -> str | None:
    m = re.match(r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+\.(\w+)", path)
    if not m:
        return None
    if m[2] in ("norm", "proj_in", "proj_out", "transformer_blocks"):
        return "Transformer2DModel"
    if m[2] in ("in_layers", "emb_layers", "out_layers", "skip_connection"):
        return "ResnetBlock2D"
    if m[2] == "op":
        return "Downsample2D"
    if m[2] == "conv":
        return "Upsample2D"
    return None


def _kohya_names(sgm_shapes, te_modules) -> dict[str, str]:
    """kohya name -> container class, of every module kohya's SDXL LoRANetwork can create."""
    names = {}
    for path, cls in _modules(sgm_shapes, "model.diffusion_model.").items():
        container = _kohya_unet_container(path)
        if container and cls in ("Linear", "Conv2d"):
            names["lora_unet_" + path.replace(".", "_")] = container
    for prefix, te in te_modules.items():
        for cpath, container in te.named_modules():
            if type(container).__name__ not in ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"):
                continue
            for child_path, child in container.named_modules():
                if type(child).__name__ in ("Linear", "Conv2d"):
                    names[f"{prefix}_{cpath}.{child_path}".replace(".", "_")] = type(container).__name__
    return names


def test_kohyas_sdxl_loader_creates_every_module_and_reads_the_metadata(lora, sdxl, sgm_shapes):
    _, path = lora
    names = _lora_names(path)
    kohya = _kohya_names(sgm_shapes, {"lora_te1": sdxl.text_encoder, "lora_te2": sdxl.text_encoder_2})
    assert sorted(names - kohya.keys()) == []
    # kohya names sgm-space U-Net paths: no diffusers-style name can slip in
    assert not [n for n in names if re.match(r"lora_unet_(down|up|mid)_block", n)]
    _, md = read_lora(path)
    # a conv LoRA exactly on kohya's conv candidates; without conv_dim, no ResNet/sampler module
    if "ss_network_args" not in md:
        assert {kohya[n] for n in names if n.startswith("lora_unet_")} == {"Transformer2DModel"}
    else:
        unet = {n for n in names if n.startswith("lora_unet_")}
        assert unet == {n for n in kohya if n.startswith("lora_unet_")}

    # library/sdxl_model_util.py MODEL_VERSION_SDXL_BASE_V1_0; library/sai_model_spec.py:
    # ARCH_SD_XL_V1_BASE + "/lora", IMPL_STABILITY_AI for `lora and sdxl`
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert md["ss_network_module"] == "networks.lora"
    assert md["ss_v2"] == "False"
    assert md["ss_text_encoder_lr"] == "1e-05"  # one value for both encoders, as kohya writes it


# ---- LyCORIS types (LoCon, LoHa, LoKr, DoRA) on SDXL ---------------------------------------------
# The same loaders over a `lycoris.kohya` file of each type: the WebUI's name lookup above (its
# module types for LyCORIS keys: network_lora/hada/lokr.py accept Linear and Conv2d, and
# MultiheadAttention through the same q/k/v/out rule); ComfyUI's and Forge's whole load (key
# maps, load_lora, calculate_weight; tests/comfy_helpers.py), whose patched weight on each layer
# of the single file must give our in-training output.

LYCO_TYPES = ["locon", "loha", "lokr", "dora"]
_PATCH_TYPE = {"locon": "lora", "dora": "lora", "loha": "loha", "lokr": "lokr"}


@pytest.fixture(scope="module", params=LYCO_TYPES)
def lyco(request, sdxl, tmp_path_factory):
    """(type, network, targets, path): every U-Net target (3x3 convs at conv dim 2) and both text encoders."""
    from lib_lora.training.lycoris_net import LycorisKohyaNetwork

    pytest.importorskip("lycoris")
    kind = request.param
    targets = sdxl.lora_targets(conv=True)
    torch.manual_seed(0)
    net = LycorisKohyaNetwork(targets, kind, dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0, factor=-1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking weights: a fresh network's up/w2 parts are zero
        for module in net.loras:
            for name, p in module.named_parameters():
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(p * (1 + 0.1 * noise) if name == "dora_scale" else noise * (0.5 if name.startswith("hada") else 0.1))
    tmp = tmp_path_factory.mktemp(f"sdxl_{kind}")
    path = write_lora(tmp / f"sdxl_{kind}.safetensors", net.state_dict_kohya(), _metadata(tmp, conv_dim=2, network_type=kind),
                      dtype=torch.float32)
    return kind, net, targets, path


def test_lycoris_files_have_kohyas_sdxl_names_and_metadata(lyco, sdxl, sgm_shapes):
    kind, _, targets, path = lyco
    tensors, md = read_lora(path)
    names = {k.partition(".")[0] for k in tensors}
    assert names == {t.name for t in targets}
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}
    kohya = _kohya_names(sgm_shapes, {"lora_te1": sdxl.text_encoder, "lora_te2": sdxl.text_encoder_2})
    assert sorted(names - kohya.keys()) == []  # the modules kohya's SDXL network makes, LoCon's convs included
    # sd-scripts train_network.py with --network_module lycoris.kohya: the modelspec of any LoRA-like
    # network on SDXL (get_sai_model_spec(..., lora=True)), the module and the --network_args given.
    assert md["ss_network_module"] == "lycoris.kohya"
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    args = json.loads(md["ss_network_args"])
    assert args["algo"] == {"dora": "locon"}.get(kind, kind) and args["conv_dim"] == "2"


def test_the_webui_matches_every_lycoris_key(lyco, sgm_shapes):
    kind, _, _, path = lyco
    names = {k.partition(".")[0] for k in read_lora(path)[0]}
    matched, failed = _webui_load_network(names, _webui_layer_mapping(sgm_shapes))
    assert failed == {}
    assert len(matched) == len(names)
    assert {cls for cls in matched.values()} <= {"Linear", "Conv2d", "MultiheadAttention"}


@pytest.mark.parametrize("loader", ["comfyui", "comfyui-839df9f", "forge"])
def test_comfyui_and_forge_read_every_lycoris_key_and_patch_as_we_train(loader, lyco, sdxl, sgm_shapes):
    from comfy_helpers import calculate_weight, comfy_load, forge_load

    from lib_lora.training.models import read_state_dict
    from lib_lora.training.tiny_model import ensure_tiny_checkpoint

    kind, net, targets, path = lyco
    sd = read_lora(path)[0]
    single = read_state_dict(ensure_tiny_checkpoint(family="sdxl"))
    unet = {k[len("model."):]: v for k, v in single.items() if k.startswith("model.diffusion_model.")}
    # ComfyUI/Forge hold both encoders in the HF layout (clip_l / clip_g), as our backbone does
    clip = {f"clip_l.transformer.{k}": v for k, v in sdxl.text_encoder.state_dict().items()}
    clip |= {f"clip_g.transformer.{k}": v for k, v in sdxl.text_encoder_2.state_dict().items()}
    load = {"comfyui": comfy_load, "comfyui-839df9f": comfy_load, "forge": forge_load}[loader]
    config = unet_config_from_keys(unet)
    patches, unread = load(sd, set(unet), config, set(clip))
    assert list(unread) == []
    assert len(patches) == len(targets) and {p[0] for p in patches.values()} == {_PATCH_TYPE[kind]}

    key_map = model_lora_keys_clip(set(clip), model_lora_keys_unet(set(unet), config))
    weights = {**unet, **clip}
    gen = torch.Generator().manual_seed(2)
    net.eval()
    net.apply()
    try:
        for t in targets:
            key = key_map[t.name]
            assert torch.equal(weights[key], t.module.weight), (t.name, key)  # the very layer
            # fp32 merge vs. LyCORIS's forward: ~1e-6 relative rounding per layer
            rel = change_against_merged(t.module, t.module, calculate_weight(patches[key], weights[key], whole_lokr_rank=loader == "comfyui-839df9f"), gen)
            assert rel <= 1e-3, (t.name, rel)
    finally:
        net.remove()
