"""ComfyUI's and Forge's LoRA loading, re-written from their public source for the loader tests.

Sources (read from the repositories; the commit is the stored version of each file):
- ComfyUI comfy/lora.py (Comfy-Org/ComfyUI ec93dcacb96b922f7cb1417b3ba22bccb082df32; the kohya
  mapping is unchanged since 00728eb20fce05955f89ef1ccf5f6167416e94cf): `model_lora_keys_unet`,
  `model_lora_keys_clip`, `load_lora` (alpha and `dora_scale` read per name, then every class of
  `weight_adapter.adapters` tried in order: LoRA, LoHa, LoKr, GLoRA, OFT, BOFT; a key no step
  read is logged "lora key not loaded").
- ComfyUI comfy/weight_adapter/ (comfyanonymous/ComfyUI): lora.py 6fd406fb14ca663225b88c6f75d7a7f2b997e5a0,
  loha.py 183b377588102d00131247aec399f8b34e1122b4, lokr.py e8f3bc5ab766ba0149ac8ba8f67c328f8bb3da7d,
  base.py 9c0cf36cd7964978850fd40f8cf76ac2cf9f9e15 (`weight_decompose`): `load` and `calculate_weight`.
  Comfy-Org/ComfyUI 839df9f213fb778adac2b36147cce73ace4321f6 changed one line of lokr.py's
  calculate_weight: with lokr_w1 and lokr_w2 both whole, dim = w2.shape[0] // w1.shape[0] (was
  None: alpha ignored); `whole_lokr_rank=True` computes that version.
- comfy/utils.py `unet_to_diffusers` (identical in Forge's packages_3rdparty/comfyui_lora_collection/utils.py).
- Forge (lllyasviel/stable-diffusion-webui-forge dfdcbab685e57677014f05a3309b48cc87383167):
  extensions-builtin/sd_forge_lora/networks.py `load_lora_for_models` (the U-Net's keys first, what
  is left against the text encoders'), backend/patcher/lora.py (`load_lora`, `model_lora_keys_*`
  from packages_3rdparty/comfyui_lora_collection/lora.py, whose kohya mapping and per-name reading
  are ComfyUI's; `merge_lora_to_weight` and `weight_decompose`, whose lora/loha/lokr branches are
  the formulas below line for line).

Only the branches a kohya-named LoRA/LyCORIS file can reach are written here (the diffusers,
OneTrainer, SimpleTuner and model-specific names map other key spellings, none of which we write).
"""

from __future__ import annotations

import re

import torch

LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}

# ---- comfy/utils.py: unet_to_diffusers -------------------------------------------------------

UNET_MAP_ATTENTIONS = {"proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "norm.weight", "norm.bias"}
TRANSFORMER_BLOCKS = {
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias",
    "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias",
}
UNET_MAP_RESNET = {
    "in_layers.2.weight": "conv1.weight", "in_layers.2.bias": "conv1.bias",
    "emb_layers.1.weight": "time_emb_proj.weight", "emb_layers.1.bias": "time_emb_proj.bias",
    "out_layers.3.weight": "conv2.weight", "out_layers.3.bias": "conv2.bias",
    "skip_connection.weight": "conv_shortcut.weight", "skip_connection.bias": "conv_shortcut.bias",
    "in_layers.0.weight": "norm1.weight", "in_layers.0.bias": "norm1.bias",
    "out_layers.0.weight": "norm2.weight", "out_layers.0.bias": "norm2.bias",
}
UNET_MAP_BASIC = {
    ("label_emb.0.0.weight", "class_embedding.linear_1.weight"), ("label_emb.0.0.bias", "class_embedding.linear_1.bias"),
    ("label_emb.0.2.weight", "class_embedding.linear_2.weight"), ("label_emb.0.2.bias", "class_embedding.linear_2.bias"),
    ("label_emb.0.0.weight", "add_embedding.linear_1.weight"), ("label_emb.0.0.bias", "add_embedding.linear_1.bias"),
    ("label_emb.0.2.weight", "add_embedding.linear_2.weight"), ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"), ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"), ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"), ("out.2.bias", "conv_out.bias"),
    ("time_embed.0.weight", "time_embedding.linear_1.weight"), ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"), ("time_embed.2.bias", "time_embedding.linear_2.bias"),
}


def unet_config_from_keys(unet_keys) -> dict:
    """The fields of the U-Net config that `unet_to_diffusers` reads, as comfy/model_detection.py
    `detect_unet_config` counts them from the keys: it walks the input blocks (a level ends at an
    `op` downsampler), taking each res block's transformer depth and, at once, that of the output
    block it mirrors (`output_blocks.{count - i - 1}`), so `transformer_depth_output` runs from
    the last output block to the first (`unet_to_diffusers` pops it from the end)."""
    keys = {k[len("diffusion_model."):] if k.startswith("diffusion_model.") else k for k in unet_keys}

    def depth(prefix: str) -> int:
        return len({m[1] for k in keys if (m := re.match(re.escape(prefix) + r"\d+\.transformer_blocks\.(\d+)\.", k))})

    input_block_count = 1 + max(int(m[1]) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k)))
    num_res_blocks, transformer_depth, transformer_depth_output = [], [], []
    last_res_blocks = 0
    for count in range(input_block_count):
        prefix, prefix_output = f"input_blocks.{count}.", f"output_blocks.{input_block_count - count - 1}."
        if f"{prefix}0.op.weight" in keys:
            num_res_blocks.append(last_res_blocks)
            last_res_blocks = 0
            transformer_depth_output.append(depth(prefix_output))
        else:
            if f"{prefix}0.in_layers.0.weight" in keys:
                last_res_blocks += 1
                transformer_depth.append(depth(prefix))
            if f"{prefix_output}0.in_layers.0.weight" in keys:
                transformer_depth_output.append(depth(prefix_output))
    num_res_blocks.append(last_res_blocks)
    return {"num_res_blocks": num_res_blocks, "channel_mult": [None] * len(num_res_blocks),
            "transformer_depth": transformer_depth, "transformer_depth_output": transformer_depth_output,
            "transformer_depth_middle": depth("middle_block.")}


def unet_to_diffusers(unet_config: dict) -> dict[str, str]:
    """comfy/utils.py unet_to_diffusers: diffusers U-Net key -> ldm U-Net key."""
    if "num_res_blocks" not in unet_config:
        return {}
    num_res_blocks = unet_config["num_res_blocks"]
    channel_mult = unet_config["channel_mult"]
    transformer_depth = unet_config["transformer_depth"][:]
    transformer_depth_output = unet_config["transformer_depth_output"][:]
    num_blocks = len(channel_mult)
    transformers_mid = unet_config.get("transformer_depth_middle", None)

    m = {}
    for x in range(num_blocks):
        n = 1 + (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x]):
            for b in UNET_MAP_RESNET:
                m[f"down_blocks.{x}.resnets.{i}.{UNET_MAP_RESNET[b]}"] = f"input_blocks.{n}.0.{b}"
            num_transformers = transformer_depth.pop(0)
            if num_transformers > 0:
                for b in UNET_MAP_ATTENTIONS:
                    m[f"down_blocks.{x}.attentions.{i}.{b}"] = f"input_blocks.{n}.1.{b}"
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        m[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = \
                            f"input_blocks.{n}.1.transformer_blocks.{t}.{b}"
            n += 1
        for k in ["weight", "bias"]:
            m[f"down_blocks.{x}.downsamplers.0.conv.{k}"] = f"input_blocks.{n}.0.op.{k}"

    i = 0
    for b in UNET_MAP_ATTENTIONS:
        m[f"mid_block.attentions.{i}.{b}"] = f"middle_block.1.{b}"
    for t in range(transformers_mid):
        for b in TRANSFORMER_BLOCKS:
            m[f"mid_block.attentions.{i}.transformer_blocks.{t}.{b}"] = f"middle_block.1.transformer_blocks.{t}.{b}"
    for i, n in enumerate([0, 2]):
        for b in UNET_MAP_RESNET:
            m[f"mid_block.resnets.{i}.{UNET_MAP_RESNET[b]}"] = f"middle_block.{n}.{b}"

    num_res_blocks = list(reversed(num_res_blocks))
    for x in range(num_blocks):
        n = (num_res_blocks[x] + 1) * x
        length = num_res_blocks[x] + 1
        for i in range(length):
            c = 0
            for b in UNET_MAP_RESNET:
                m[f"up_blocks.{x}.resnets.{i}.{UNET_MAP_RESNET[b]}"] = f"output_blocks.{n}.0.{b}"
            c += 1
            num_transformers = transformer_depth_output.pop()
            if num_transformers > 0:
                c += 1
                for b in UNET_MAP_ATTENTIONS:
                    m[f"up_blocks.{x}.attentions.{i}.{b}"] = f"output_blocks.{n}.1.{b}"
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        m[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = \
                            f"output_blocks.{n}.1.transformer_blocks.{t}.{b}"
            if i == length - 1:
                for k in ["weight", "bias"]:
                    m[f"up_blocks.{x}.upsamplers.0.conv.{k}"] = f"output_blocks.{n}.{c}.conv.{k}"
            n += 1
    for k in UNET_MAP_BASIC:
        m[k[1]] = k[0]
    return m


# ---- comfy/lora.py: model_lora_keys_unet / model_lora_keys_clip --------------------------------

def model_lora_keys_unet(unet_keys, unet_config: dict | None, key_map: dict | None = None) -> dict[str, str]:
    """kohya names -> model key: `lora_unet_<ldm path>` for every `diffusion_model.*.weight`, and
    `lora_unet_<diffusers path>` through unet_to_diffusers (the SD1.5 kohya names)."""
    key_map = {} if key_map is None else key_map
    for k in unet_keys:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
    for k, v in unet_to_diffusers(unet_config or {}).items():
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[:-len(".weight")].replace(".", "_")] = f"diffusion_model.{v}"
    return key_map


def model_lora_keys_clip(clip_keys, key_map: dict | None = None) -> dict[str, str]:
    key_map = {} if key_map is None else key_map
    clip_l_present = False
    for b in range(32):
        for c, lora_c in LORA_CLIP_MAP.items():
            k = f"clip_h.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in clip_keys:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{lora_c}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{lora_c}"] = k
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in clip_keys:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{lora_c}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{lora_c}"] = k
                clip_l_present = True
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in clip_keys:
                if clip_l_present:
                    key_map[f"lora_te2_text_model_encoder_layers_{b}_{lora_c}"] = k
                else:
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{lora_c}"] = k
    return key_map


# ---- load_lora: what each name's tensors become ------------------------------------------------

def _load_lora_adapter(x, lora, alpha, dora_scale, loaded):
    if f"{x}.lora_up.weight" in lora:  # regular_lora (the diffusers spellings are other names)
        mid = lora.get(f"{x}.lora_mid.weight")
        if mid is not None:
            loaded.add(f"{x}.lora_mid.weight")
        loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight"}
        return ("lora", (lora[f"{x}.lora_up.weight"], lora[f"{x}.lora_down.weight"], alpha, mid, dora_scale, None))
    return None


def _load_loha_adapter(x, lora, alpha, dora_scale, loaded):
    if f"{x}.hada_w1_a" not in lora:
        return None
    t1 = t2 = None
    if f"{x}.hada_t1" in lora:
        t1, t2 = lora[f"{x}.hada_t1"], lora[f"{x}.hada_t2"]
        loaded |= {f"{x}.hada_t1", f"{x}.hada_t2"}
    loaded |= {f"{x}.hada_w1_a", f"{x}.hada_w1_b", f"{x}.hada_w2_a", f"{x}.hada_w2_b"}
    return ("loha", (lora[f"{x}.hada_w1_a"], lora[f"{x}.hada_w1_b"], alpha, lora[f"{x}.hada_w2_a"],
                     lora[f"{x}.hada_w2_b"], t1, t2, dora_scale))


def _load_lokr_adapter(x, lora, alpha, dora_scale, loaded):
    parts = {}
    for p in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"):
        parts[p] = lora.get(f"{x}.{p}")
        if parts[p] is not None:
            loaded.add(f"{x}.{p}")
    if any(parts[p] is not None for p in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")):
        return ("lokr", (parts["lokr_w1"], parts["lokr_w2"], alpha, parts["lokr_w1_a"], parts["lokr_w1_b"],
                         parts["lokr_w2_a"], parts["lokr_w2_b"], parts["lokr_t2"], dora_scale))
    return None


ADAPTERS = (_load_lora_adapter, _load_loha_adapter, _load_lokr_adapter)  # weight_adapter.adapters' order


def load_lora(lora: dict[str, torch.Tensor], to_load: dict[str, str]):
    """comfy/lora.py load_lora (and Forge's copy): (model key -> patch, keys no step read)."""
    patch_dict, loaded = {}, set()
    for x in to_load:
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        dora_scale = None
        if f"{x}.dora_scale" in lora:
            dora_scale = lora[f"{x}.dora_scale"]
            loaded.add(f"{x}.dora_scale")
        for adapter in ADAPTERS:  # every adapter is tried ("continue", not "break"): the last that loads wins
            patch = adapter(x, lora, alpha, dora_scale, loaded)
            if patch is not None:
                patch_dict[to_load[x]] = patch
    return patch_dict, {k: v for k, v in lora.items() if k not in loaded}


def comfy_load(lora, unet_keys, unet_config, clip_keys):
    """comfy/sd.py load_lora_for_models: one key map (U-Net, then text encoders), one load_lora."""
    key_map = model_lora_keys_unet(unet_keys, unet_config)
    key_map = model_lora_keys_clip(clip_keys, key_map)
    return load_lora(lora, key_map)


def forge_load(lora, unet_keys, unet_config, clip_keys):
    """Forge sd_forge_lora/networks.py load_lora_for_models: the U-Net's map, then what is left
    against the text encoders' map; `lora_unmatch` is what neither read."""
    lora_unet, rest = load_lora(lora, model_lora_keys_unet(unet_keys, unet_config))
    lora_clip, rest = load_lora(rest, model_lora_keys_clip(clip_keys))
    return {**lora_unet, **lora_clip}, rest


# ---- calculate_weight: the merged weight -----------------------------------------------------

def weight_decompose(dora_scale, weight, lora_diff, alpha, strength):
    """comfy/weight_adapter/base.py weight_decompose (Forge backend/patcher/lora.py: the same), function=identity."""
    dora_scale = dora_scale.to(torch.float32)
    lora_diff = lora_diff * alpha
    weight_calc = weight + lora_diff.type(weight.dtype)
    wd_on_output_axis = dora_scale.shape[0] == weight_calc.shape[0]
    if wd_on_output_axis:
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        weight_norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                       .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale / weight_norm).type(weight.dtype)
    if strength != 1.0:
        return weight + strength * (weight_calc - weight)
    return weight_calc


def calculate_weight(patch, weight: torch.Tensor, strength: float = 1.0, whole_lokr_rank: bool = False) -> torch.Tensor:
    """The adapter's calculate_weight (float32 intermediate): the patched weight; `whole_lokr_rank`:
    as ComfyUI computes LoKr from 839df9f on."""
    kind, v = patch
    weight = weight.detach().clone().float()
    f32 = torch.float32
    if kind == "lora":
        mat1, mat2 = v[0].to(f32), v[1].to(f32)
        alpha = v[2] / mat2.shape[0] if v[2] is not None else 1.0
        assert v[3] is None, "no lora_mid in our files"
        lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
        dora_scale = v[4]
    elif kind == "loha":
        w1a, w1b, w2a, w2b = (t.to(f32) for t in (v[0], v[1], v[3], v[4]))
        alpha = v[2] / w1b.shape[0] if v[2] is not None else 1.0
        assert v[5] is None, "no Tucker factors in our files"
        lora_diff = (torch.mm(w1a, w1b) * torch.mm(w2a, w2b)).reshape(weight.shape)
        dora_scale = v[7]
    elif kind == "lokr":
        w1, w2, _, w1_a, w1_b, w2_a, w2_b, t2, dora_scale = v
        dim = w2.shape[0] // w1.shape[0] if whole_lokr_rank and w1 is not None and w2 is not None else None
        if w1 is None:
            dim = w1_b.shape[0]
            w1 = torch.mm(w1_a.to(f32), w1_b.to(f32))
        else:
            w1 = w1.to(f32)
        if w2 is None:
            dim = w2_b.shape[0]
            assert t2 is None, "no Tucker factors in our files"
            w2 = torch.mm(w2_a.to(f32), w2_b.to(f32))
        else:
            w2 = w2.to(f32)
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        alpha = v[2] / dim if v[2] is not None and dim is not None else 1.0
        lora_diff = torch.kron(w1, w2).reshape(weight.shape)
    else:
        raise AssertionError(f"patch type {kind} is not one our files make")
    if dora_scale is not None:
        return weight_decompose(dora_scale, weight, lora_diff, alpha, strength)
    return weight + (strength * alpha) * lora_diff
