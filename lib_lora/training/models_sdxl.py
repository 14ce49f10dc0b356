"""Loading SDXL: a single-file sgm checkpoint, a diffusers folder, or the built-in tiny-sdxl;
and `load_backbone`, which tells SDXL from SD1.5 and sends SD1.5 to `models.py`.

Offline, like the SD1.5 loader: configs come from the checkpoint's tensor shapes and the
sgm -> diffusers weight conversion is diffusers' own (`diffusers.loaders.single_file_utils`).
SDXL refiners, SDXL inpainting models and SD2 checkpoints are recognised and refused.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import torch

from lib_lora.errors import ModelLoadError
from lib_lora.training import models
from lib_lora.training.backbone_sdxl import SDXLBackbone
from lib_lora.training.family import SD15, SDXL

# ---- SDXL checkpoint layout (the family's own facts are in family.SDXL) -----------------------
# Single-file (sgm DiffusionEngine) prefixes, from generative-models' sd_xl_base.yaml
# conditioner: embedder 0 is FrozenCLIPEmbedder (a transformers CLIPTextModel under
# `transformer.`), embedder 1 FrozenOpenCLIPEmbedder2 (an open_clip model under `model.`).
UNET = models.UNET  # model.diffusion_model.
VAE = models.VAE  # first_stage_model.
TE1 = "conditioner.embedders.0.transformer."
TE2 = "conditioner.embedders.1.model."
REFINER_TE = "conditioner.embedders.0.model."  # the refiner's only embedder is OpenCLIP bigG
SD2_TE = "cond_stage_model.model."
SDXL_HEAD_CHANNELS = 64  # sd_xl_base.yaml num_head_channels: heads = channels / 64
SDXL_UNET_BASE = {  # diffusers' SDXL U-Net config values that shapes do not tell
    "addition_embed_type": "text_time",
    "use_linear_projection": True,
    "sample_size": 128,
}
TINY_SDXL = "tiny-sdxl"
FAMILY_SDXL, FAMILY_SD15 = SDXL.name, SD15.name  # what the kind functions return for the two families
# --------------------------------------------------------------------------------------------

_MESSAGES = {
    "refiner": "{name} is an SDXL refiner, which only finishes images a base model made; a LoRA is trained "
               "on an SDXL base model (SDXL 1.0, Pony, Illustrious, NoobAI…): choose one of those.",
    "inpaint": "{name} is an SDXL inpainting checkpoint (9 input channels); choose a plain SDXL "
               "text-to-image model.",
    "sd2": "{name} is an SD2.x checkpoint (OpenCLIP text encoder, 1024-wide context); Fast LoRA trains "
           "SD1.5 and SDXL LoRAs: choose one of those models.",
}


# --------------------------------------------------------------------------------------------
# Telling families apart, from key names and shapes alone


def _shapes_of_file(path: Path) -> Mapping[str, tuple[int, ...]] | None:
    """Key -> shape: from a safetensors header, or a zip .ckpt memory-mapped, without reading the
    tensors; a legacy (pre-zip pickle) .ckpt, which cannot be memory-mapped, read whole through
    `models.read_state_dict` (weights only: a pickle that holds anything but tensors is refused).
    None when the file cannot be read that way (the full read then gives the user's sentence)."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        if path.suffix.lower() in {".ckpt", ".pt", ".pth", ".bin"}:
            if not zipfile.is_zipfile(path):
                return {k: tuple(v.shape) for k, v in models.read_state_dict(path).items()}
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                obj = obj["state_dict"]
            if isinstance(obj, dict):
                return {k: tuple(v.shape) for k, v in obj.items() if isinstance(v, torch.Tensor)}
    except Exception:  # noqa: BLE001 - unreadable here; the full read gives the user's sentence
        return None
    return None


@lru_cache(maxsize=16)
def _file_kind(path: str, size: int, mtime: float) -> str:
    # Per file version: a legacy .ckpt is read whole to learn its kind, and a run asks more than once.
    shapes = _shapes_of_file(Path(path))
    return single_file_kind(shapes) if shapes is not None else FAMILY_SD15


def single_file_kind(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """"sdxl", "refiner", "inpaint" (SDXL), "sd2", or "sd15" (anything else: models.py judges it)."""
    keys = shapes.keys()
    if any(k.startswith(REFINER_TE) for k in keys) and not any(k.startswith(TE2) for k in keys):
        return "refiner"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        adm = shapes.get(UNET + "label_emb.0.0.weight")
        if adm is not None and adm[1] == 2560:  # refiner: 1280 pooled + 5 x 256 (aesthetic score)
            return "refiner"
        w_in = shapes.get(UNET + "input_blocks.0.0.weight")
        if w_in is not None and w_in[1] != 4:
            return "inpaint"
        return FAMILY_SDXL
    ctx = next((s for k, s in shapes.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    if any(k.startswith(SD2_TE) for k in keys) or (ctx is not None and ctx[1] == 1024):
        return "sd2"
    return FAMILY_SD15


def folder_kind(folder: Path) -> str:
    """The same for a diffusers folder, from its unet/config.json and the parts it has."""
    try:
        cfg = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = None
    if not isinstance(cfg, dict):
        return FAMILY_SDXL if (folder / "text_encoder_2").is_dir() else FAMILY_SD15  # the loader says what is wrong
    has_te1, has_te2 = (folder / "text_encoder").is_dir(), (folder / "text_encoder_2").is_dir()
    if has_te2 and (not has_te1 or cfg.get("projection_class_embeddings_input_dim") == 2560):
        return "refiner"
    if has_te2 or cfg.get("addition_embed_type") == "text_time":
        return "inpaint" if cfg.get("in_channels", 4) != 4 else FAMILY_SDXL
    if cfg.get("cross_attention_dim") == 1024:
        return "sd2"
    return FAMILY_SD15


def refuse(kind: str, name: str) -> None:
    """One sentence for a model this family cannot train."""
    if kind in _MESSAGES:
        raise ModelLoadError(_MESSAGES[kind].format(name=name))
    if kind == FAMILY_SD15:
        raise ModelLoadError(f"{name} is not an SDXL model (it has no conditioner.embedders.* text encoders).")


def model_family(base_model: str) -> str:
    """"sdxl" or "sd15" for a base-model setting; refused kinds raise their sentence."""
    if base_model == TINY_SDXL:
        return FAMILY_SDXL
    if base_model in ("", "tiny"):
        return FAMILY_SD15
    path = Path(base_model).expanduser()
    if path.is_dir():
        kind = folder_kind(path)
    elif path.is_file():
        st = path.stat()
        kind = _file_kind(str(path.resolve()), st.st_size, st.st_mtime)
    else:
        kind = FAMILY_SD15  # the SD1.5 loader says it is missing
    if kind in _MESSAGES:
        refuse(kind, path.name)
    return kind


def load_backbone(base_model: str = "tiny", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The model to train on, of whichever family it is (SDXLBackbone or models.py's SD1.5 one)."""
    if model_family(base_model) == FAMILY_SDXL:
        return load_sdxl_backbone(base_model, device, dtype)
    return models.load_backbone(base_model, device, dtype)


# --------------------------------------------------------------------------------------------
# Configs from tensor shapes (single file)


def _count(sd: Mapping, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def infer_sdxl_unet_config(sd: Mapping[str, torch.Tensor], pooled_dim: int) -> dict:
    """diffusers UNet2DConditionModel config of an sgm SDXL U-Net, from its shapes."""
    cfg = {**models.sd15_unet_config(), **SDXL_UNET_BASE}
    u = re.escape(UNET)
    n_input = _count(sd, u + r"input_blocks\.(\d+)\.")
    levels = n_input // 3  # conv_in + 2 layers per level + a down-sampler between levels
    if n_input != 3 * levels or levels < 2:
        raise ModelLoadError("This checkpoint's U-Net does not have the SDXL layout (levels of 2 layers each).")
    chans, down, depth = [], [], []
    for i in range(levels):
        chans.append(sd[f"{UNET}input_blocks.{1 + 3 * i}.0.out_layers.3.weight"].shape[0])
        n = _count(sd, u + rf"input_blocks\.{1 + 3 * i}\.1\.transformer_blocks\.(\d+)\.")
        down.append("CrossAttnDownBlock2D" if n else "DownBlock2D")
        depth.append(n or 1)  # diffusers wants a number even for a level without attention
    mid = _count(sd, u + r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    if mid != depth[-1]:
        raise ModelLoadError(f"This checkpoint's U-Net middle block has {mid} transformer layers, not {depth[-1]} "
                             "like its last level; it is not an SDXL layout Fast LoRA knows.")
    cfg["block_out_channels"] = chans
    cfg["down_block_types"] = down
    cfg["up_block_types"] = [t.replace("Down", "Up") for t in reversed(down)]
    cfg["transformer_layers_per_block"] = depth
    cfg["attention_head_dim"] = [max(1, c // SDXL_HEAD_CHANNELS) for c in chans]  # diffusers: number of heads
    ctx = next(v for k, v in sd.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight"))
    cfg["cross_attention_dim"] = ctx.shape[1]
    proj_in = next(v for k, v in sd.items() if k.startswith(UNET) and k.endswith(".proj_in.weight"))
    cfg["use_linear_projection"] = proj_in.ndim == 2
    adm = sd[UNET + "label_emb.0.0.weight"].shape[1]
    cfg["projection_class_embeddings_input_dim"] = adm
    time_dim, rest = divmod(adm - pooled_dim, 6)
    if rest or time_dim <= 0 or time_dim % 2:
        raise ModelLoadError(f"This checkpoint's U-Net takes a {adm}-wide extra vector, which does not fit a "
                             f"{pooled_dim}-wide pooled text embedding plus six size embeddings.")
    cfg["addition_time_embed_dim"] = time_dim
    t_emb = sd[UNET + "time_embed.0.weight"].shape[0]
    if t_emb != 4 * chans[0]:
        cfg["time_embedding_dim"] = t_emb
    return cfg


def infer_open_clip_config(sd: Mapping[str, torch.Tensor], prefix: str = TE2):
    """transformers CLIPTextConfig of an open_clip text tower (bigG for SDXL), from its shapes."""
    cfg = models.sd15_text_encoder_config()
    vocab, width = sd[prefix + "token_embedding.weight"].shape
    cfg.vocab_size, cfg.hidden_size = vocab, width
    cfg.max_position_embeddings = sd[prefix + "positional_embedding"].shape[0]
    cfg.num_hidden_layers = _count(sd, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    cfg.intermediate_size = sd[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    cfg.num_attention_heads = max(1, width // 64)  # open_clip's text towers: 64 dims per head
    cfg.projection_dim = sd[prefix + "text_projection"].shape[1]
    cfg.hidden_act = "gelu"  # open_clip uses nn.GELU (exact), OpenAI CLIP quick_gelu
    return cfg


def check_sdxl(sd: Mapping[str, torch.Tensor], name: str) -> None:
    """Refuse anything that is not an SDXL base text-to-image checkpoint, saying what it is."""
    keys = sd.keys()
    if any(k.startswith(models.LORA_KEY_PREFIXES) for k in keys):
        raise ModelLoadError(f"{name} is a LoRA, not a base model. Choose an SDXL checkpoint as the base model.")
    refuse(single_file_kind({k: tuple(v.shape) for k, v in sd.items()}), name)
    for prefix, what in ((UNET, "U-Net (model.diffusion_model.*)"), (TE1, "CLIP ViT-L text encoder (conditioner.embedders.0.*)"),
                         (TE2, "OpenCLIP bigG text encoder (conditioner.embedders.1.*)"), (VAE, "VAE (first_stage_model.*)")):
        if not any(k.startswith(prefix) for k in keys):
            raise ModelLoadError(f"{name} has no {what} weights: it is incomplete; download it again or choose another model.")


def sdxl_modules_from_state_dict(sd: dict[str, torch.Tensor], name: str):
    """(unet, vae, text_encoder, text_encoder_2) diffusers/transformers modules from an sgm state dict."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    check_sdxl(sd, name)
    try:
        te2_cfg = infer_open_clip_config(sd)
        unet_cfg = infer_sdxl_unet_config(sd, te2_cfg.projection_dim)
        vae_cfg = {**models.infer_vae_config(sd), "scaling_factor": SDXL.latent_scale}
        te1_weights = {k: v for k, v in convert_ldm_clip_checkpoint(sd).items() if k.startswith("text_model.")}
        te1_cfg = models.infer_clip_config(te1_weights)
        with models._quiet():
            unet_w = convert_ldm_unet_checkpoint(sd, unet_cfg)
            vae_w = convert_ldm_vae_checkpoint(sd, vae_cfg)
    except (KeyError, StopIteration, IndexError) as err:
        example = f" (e.g. {err.args[0]})" if isinstance(err, KeyError) and err.args else ""
        raise ModelLoadError(
            f"{name} lacks weights every SDXL checkpoint has{example}: it is incomplete or not SDXL; "
            "download it again or choose another model."
        ) from None
    if unet_cfg["cross_attention_dim"] != te1_cfg.hidden_size + te2_cfg.hidden_size:
        raise ModelLoadError(f"{name}: the U-Net's {unet_cfg['cross_attention_dim']}-wide context does not match its "
                             f"text encoders ({te1_cfg.hidden_size} + {te2_cfg.hidden_size}); the file is not a usable SDXL model.")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in unet_cfg.items() if not k.startswith("_")})
        vae = AutoencoderKL(**{k: v for k, v in vae_cfg.items() if not k.startswith("_")})
        text_encoder_2 = CLIPTextModelWithProjection(te2_cfg)
    text_encoder = CLIPTextModel(te1_cfg)
    unet, vae, text_encoder_2 = unet.to_empty(device="cpu"), vae.to_empty(device="cpu"), text_encoder_2.to_empty(device="cpu")
    te2_w = convert_open_clip_checkpoint(text_encoder_2, sd, prefix=TE2)
    # position_ids: a constant buffer (not saved by transformers >= 4.31, absent from open_clip
    # files) that to_empty left unset.
    pos = text_encoder_2.text_model.embeddings.position_ids
    with torch.no_grad():
        pos.copy_(torch.arange(pos.shape[-1]).expand_as(pos))
    models._load_into(unet, unet_w, "U-Net", family=SDXL.label)
    models._load_into(vae, vae_w, "VAE", family=SDXL.label)
    models._load_into(text_encoder, te1_weights, "CLIP ViT-L text encoder", ignore=("position_ids",), family=SDXL.label)
    models._load_into(text_encoder_2, te2_w, "OpenCLIP bigG text encoder", ignore=("position_ids",), family=SDXL.label)
    return unet, vae, text_encoder, text_encoder_2


# --------------------------------------------------------------------------------------------
# Backbones


def load_sdxl_backbone(base_model: str = TINY_SDXL, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> SDXLBackbone:
    """The SDXL model to train on, as an SDXLBackbone with frozen weights."""
    from diffusers import DDPMScheduler

    from lib_lora.training.tokenizer import load_clip_tokenizer, load_clip_tokenizer_2

    if base_model == TINY_SDXL:
        from lib_lora.training.tiny_model import ensure_tiny_checkpoint

        path, display = ensure_tiny_checkpoint(family=FAMILY_SDXL), TINY_SDXL
    else:
        path = Path(base_model).expanduser()
        display = path.name
    if path.is_dir():
        unet, vae, te1, te2, tok1, tok2 = _load_sdxl_folder(path)
    else:
        sd = models.read_state_dict(path)
        unet, vae, te1, te2 = sdxl_modules_from_state_dict(sd, path.name)
        del sd
        tok1, tok2 = load_clip_tokenizer(), load_clip_tokenizer_2()
    # kohya trains SDXL on SD1.5's DDPM schedule (scaled_linear 0.00085..0.012, 1000 steps, epsilon).
    scheduler = DDPMScheduler.from_config(models.sd15_scheduler_config())
    backbone = SDXLBackbone(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                            tokenizer_2=tok2, scheduler=scheduler, model_name=display, model_path=path)
    return backbone.to(device, dtype)


def _load_sdxl_folder(folder: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lib_lora.training.tokenizer import load_clip_tokenizer, load_clip_tokenizer_2

    parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    missing = [p for p in parts if not (folder / p).is_dir()]
    kind = folder_kind(folder)
    if kind != FAMILY_SDXL:
        refuse(kind, folder.name)
    if missing:
        raise ModelLoadError(f"{folder} is not a complete diffusers SDXL folder: it lacks {', '.join(p + '/' for p in missing)}.")
    try:
        unet = models._load_part(folder / "unet", UNet2DConditionModel, "U-Net", family=SDXL.label)
        vae = models._load_part(folder / "vae", AutoencoderKL, "VAE", family=SDXL.label)
        te1 = models._load_part(folder / "text_encoder", CLIPTextModel, "CLIP ViT-L text encoder", family=SDXL.label)
        te2 = models._load_part(folder / "text_encoder_2", CLIPTextModelWithProjection, "OpenCLIP bigG text encoder",
                                family=SDXL.label)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
        raise ModelLoadError(f"{folder} could not be loaded as a diffusers SDXL model: {err}") from None
    tok1_dir, tok2_dir = folder / "tokenizer", folder / "tokenizer_2"
    tok1 = load_clip_tokenizer(tok1_dir if tok1_dir.is_dir() else None)
    tok2 = load_clip_tokenizer_2(tok2_dir if tok2_dir.is_dir() else None)
    return unet, vae, te1, te2, tok1, tok2
