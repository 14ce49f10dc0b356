"""Loading SD1.5: a single-file compvis checkpoint, a diffusers folder, or the tiny built-in model.

Fully offline: the SD1.5 configs ship in `configs/`; widths are read from the checkpoint's
tensor shapes (so the tiny model loads through the same path as a real one), and the
compvis -> diffusers weight conversion is diffusers' own. `.ckpt` files, and a diffusers
folder's `.bin` files, are only read with `torch.load(weights_only=True)`. SD2, SDXL and inpainting checkpoints are recognised and refused.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import re
from functools import lru_cache
from pathlib import Path

import torch

from lib_lora.errors import ModelLoadError
from lib_lora.training.backbone import DiffusersBackbone
from lib_lora.training.family import SD15, all_lora_prefixes

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).with_name("configs")
UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."
LORA_KEY_PREFIXES = tuple(p + "_" for p in all_lora_prefixes())  # a LoRA file of any family


def _config(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def sd15_unet_config() -> dict:
    return _config("sd15_unet")


def sd15_vae_config() -> dict:
    return _config("sd15_vae")


def sd15_text_encoder_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**_config("sd15_text_encoder"))


def sd15_scheduler_config() -> dict:
    return _config("sd15_scheduler")


# --------------------------------------------------------------------------------------------
# Reading files


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or (weights-only) .ckpt file, with clear errors."""
    if not path.exists():
        raise ModelLoadError(f"Base model not found: {path}. Give the path of an SD1.5 .safetensors file or a diffusers folder.")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes): the download probably failed; download it again.")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ModelLoadError(
                f"{path.name} cannot be read as safetensors ({err}). The file is probably truncated or "
                "corrupt: download it again."
            ) from None
    if suffix in {".ckpt", ".pt", ".pth", ".bin"}:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickle raises many kinds
            raise ModelLoadError(
                f"{path.name} was refused: it is not a plain weights file ({type(err).__name__}). Only "
                ".safetensors, or .ckpt files that contain nothing but tensors, are loaded, because a .ckpt can "
                "run arbitrary code. Use the .safetensors version of this model."
            ) from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ModelLoadError(f"{path.name} does not contain a state dict of weights.")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise ModelLoadError(f"{path.name}: unsupported model file type {suffix!r}; use .safetensors (or a diffusers folder).")


def check_sd15(sd: dict[str, torch.Tensor], name: str) -> None:
    """Refuse anything that is not an SD1.x text-to-image checkpoint, saying what it is."""
    keys = sd.keys()
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ModelLoadError(f"{name} is an SDXL checkpoint; Fast LoRA trains SD1.5 LoRAs. Choose an SD1.5 model.")
    if any(k.startswith(LORA_KEY_PREFIXES) for k in keys):
        raise ModelLoadError(f"{name} is a LoRA, not a base model. Choose an SD1.5 checkpoint as the base model.")
    if not any(k.startswith(UNET) for k in keys):
        raise ModelLoadError(
            f"{name} has no Stable Diffusion U-Net weights (model.diffusion_model.*): it may be a VAE, an "
            "embedding or another kind of model. Choose an SD1.5 checkpoint."
        )
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ModelLoadError(f"{name} is an SD2.x checkpoint (OpenCLIP text encoder); Fast LoRA trains SD1.5 LoRAs.")
    w_in = sd.get(UNET + "input_blocks.0.0.weight")
    if w_in is not None and w_in.shape[1] != 4:
        kind = "an inpainting" if w_in.shape[1] == 9 else "an instruct/depth"
        raise ModelLoadError(
            f"{name} is {kind} checkpoint ({w_in.shape[1]} input channels); choose a plain SD1.5 text-to-image model."
        )
    proj = next((v for k, v in sd.items() if k.startswith(UNET) and k.endswith(".proj_in.weight")), None)
    ctx = next((v for k, v in sd.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    if (proj is not None and proj.ndim == 2) or (ctx is not None and ctx.shape[1] == 1024):
        raise ModelLoadError(f"{name} is an SD2.x checkpoint; Fast LoRA trains SD1.5 LoRAs.")
    if not any(k.startswith(CLIP) for k in keys):
        raise ModelLoadError(f"{name} has no CLIP text encoder weights (cond_stage_model.*); it cannot be trained on.")
    if not any(k.startswith(VAE) for k in keys):
        raise ModelLoadError(f"{name} has no VAE weights (first_stage_model.*); use a checkpoint with a baked-in VAE.")


# --------------------------------------------------------------------------------------------
# Configs from tensor shapes


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def infer_unet_config(sd: dict[str, torch.Tensor]) -> dict:
    cfg = sd15_unet_config()
    n_input = _count(sd, re.escape(UNET) + r"input_blocks\.(\d+)\.")
    levels = n_input // 3  # conv_in + 2 layers per level + a down-sampler between levels
    if n_input != 3 * levels or levels < 2 or _count(sd, re.escape(UNET) + r"input_blocks\.1\.(\d+)\.") == 0:
        raise ModelLoadError("This checkpoint's U-Net does not have the SD1.5 layout (4 levels of 2 layers).")
    chans, down = [], []
    for i in range(levels):
        chans.append(sd[f"{UNET}input_blocks.{1 + 3 * i}.0.out_layers.3.weight"].shape[0])
        has_attn = f"{UNET}input_blocks.{1 + 3 * i}.1.proj_in.weight" in sd
        down.append("CrossAttnDownBlock2D" if has_attn else "DownBlock2D")
    cfg["block_out_channels"] = chans
    cfg["down_block_types"] = down
    cfg["up_block_types"] = [t.replace("Down", "Up") for t in reversed(down)]
    ctx = next(v for k, v in sd.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight"))
    cfg["cross_attention_dim"] = ctx.shape[1]
    return cfg


def infer_vae_config(sd: dict[str, torch.Tensor]) -> dict:
    cfg = sd15_vae_config()
    levels = _count(sd, re.escape(VAE) + r"encoder\.down\.(\d+)\.")
    cfg["block_out_channels"] = [sd[f"{VAE}encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
    cfg["down_block_types"] = ["DownEncoderBlock2D"] * levels
    cfg["up_block_types"] = ["UpDecoderBlock2D"] * levels
    cfg["layers_per_block"] = _count(sd, re.escape(VAE) + r"encoder\.down\.0\.block\.(\d+)\.")
    cfg["latent_channels"] = sd[f"{VAE}encoder.conv_out.weight"].shape[0] // 2
    return cfg


def _clip_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.startswith(CLIP):
            rest = k[len(CLIP):]
            out[rest if rest.startswith("text_model.") else "text_model." + rest] = v
    return out


def infer_clip_config(te: dict[str, torch.Tensor]):
    cfg = sd15_text_encoder_config()
    emb = te["text_model.embeddings.token_embedding.weight"]
    cfg.vocab_size, cfg.hidden_size = emb.shape
    cfg.max_position_embeddings = te["text_model.embeddings.position_embedding.weight"].shape[0]
    cfg.num_hidden_layers = _count(te, r"text_model\.encoder\.layers\.(\d+)\.")
    cfg.intermediate_size = te["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    cfg.num_attention_heads = max(1, cfg.hidden_size // 64)  # OpenAI CLIP: 64 dims per head
    cfg.projection_dim = cfg.hidden_size
    return cfg


# --------------------------------------------------------------------------------------------
# Building modules


def _load_into(module: torch.nn.Module, weights: dict[str, torch.Tensor], what: str, ignore: tuple[str, ...] = (),
               family: str = "SD1.5") -> None:
    result = module.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(ignore)] if ignore else list(result.missing_keys)
    unexpected = [k for k in result.unexpected_keys if not k.endswith(ignore)] if ignore else list(result.unexpected_keys)
    if missing or unexpected:
        raise ModelLoadError(
            f"The checkpoint's {what} does not match {family}: {len(missing)} weights missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}). Is this an {family} model?"
        )


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def modules_from_state_dict(sd: dict[str, torch.Tensor], name: str):
    """(unet, vae, text_encoder) diffusers/transformers modules from a compvis state dict."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextModel

    check_sd15(sd, name)
    try:
        unet_cfg, vae_cfg = infer_unet_config(sd), infer_vae_config(sd)
        te_weights = _clip_weights(sd)
        te_cfg = infer_clip_config(te_weights)
        with _quiet():
            unet_w = convert_ldm_unet_checkpoint(sd, unet_cfg)
            vae_w = convert_ldm_vae_checkpoint(sd, vae_cfg)
    except (KeyError, StopIteration, IndexError) as err:  # a weight the layout needs is not there
        example = f" (e.g. {err.args[0]})" if isinstance(err, KeyError) and err.args else ""
        raise ModelLoadError(
            f"{name} lacks weights every SD1.5 checkpoint has{example}: it is incomplete or not SD1.5; "
            "download it again or choose another model."
        ) from None
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in unet_cfg.items() if not k.startswith("_")})
        vae = AutoencoderKL(**{k: v for k, v in vae_cfg.items() if not k.startswith("_")})
    text_encoder = CLIPTextModel(te_cfg)
    unet = unet.to_empty(device="cpu")
    vae = vae.to_empty(device="cpu")
    _load_into(unet, unet_w, "U-Net")
    _load_into(vae, vae_w, "VAE")
    # position_ids is a constant buffer that some checkpoints carry and some do not.
    _load_into(text_encoder, te_weights, "text encoder", ignore=("position_ids",))
    return unet, vae, text_encoder


@lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file (cached per path, size and mtime: a 2 GB checkpoint takes seconds)."""
    st = Path(path).stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime)


def load_backbone(base_model: str = "tiny", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DiffusersBackbone:
    """The SD1.5 model to train on, as a DiffusersBackbone with frozen weights."""
    from diffusers import DDPMScheduler

    from lib_lora.training.tokenizer import load_clip_tokenizer

    if base_model in ("", "tiny"):
        from lib_lora.training.tiny_model import ensure_tiny_checkpoint

        path = ensure_tiny_checkpoint()
        display = "tiny"
    else:
        path = Path(base_model).expanduser()
        display = path.name
    if path.is_dir():
        unet, vae, text_encoder, tokenizer = _load_diffusers_folder(path)
    else:
        sd = read_state_dict(path)
        unet, vae, text_encoder = modules_from_state_dict(sd, path.name)
        del sd
        tokenizer = load_clip_tokenizer()
    scheduler = DDPMScheduler.from_config(sd15_scheduler_config())
    backbone = DiffusersBackbone(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        model_name=display, model_path=path, family=SD15,
    )
    return backbone.to(device, dtype)


def _load_diffusers_folder(folder: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from lib_lora.training.tokenizer import load_clip_tokenizer

    if not (folder / "unet").is_dir() or not (folder / "text_encoder").is_dir():
        raise ModelLoadError(
            f"{folder} is not a diffusers SD1.5 folder (it needs unet/, vae/, text_encoder/ and tokenizer/)."
        )
    if (folder / "text_encoder_2").exists():
        raise ModelLoadError(f"{folder} is an SDXL model; Fast LoRA trains SD1.5 LoRAs.")
    try:
        unet_cfg = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        unet_cfg = err
    if not isinstance(unet_cfg, dict):
        why = "it is missing" if isinstance(unet_cfg, FileNotFoundError) else "it is not a JSON object"
        raise ModelLoadError(
            f"{folder} has no usable unet/config.json ({why}): the diffusers folder is incomplete; download it again."
        )
    # SD2 has 1024-wide text features, SDXL 2048; inpainting/instruct U-Nets take extra channels.
    if unet_cfg.get("cross_attention_dim") in (1024, 2048) or unet_cfg.get("in_channels", 4) != 4:
        raise ModelLoadError(f"{folder} is not an SD1.5 text-to-image model (SD2, inpainting or other).")
    try:
        unet = _load_part(folder / "unet", UNet2DConditionModel, "U-Net")
        vae = _load_part(folder / "vae", AutoencoderKL, "VAE")
        text_encoder = _load_part(folder / "text_encoder", CLIPTextModel, "text encoder")
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:  # TypeError: a config value of the wrong kind
        raise ModelLoadError(f"{folder} could not be loaded as a diffusers model: {err}") from None
    tok_dir = folder / "tokenizer"
    tokenizer = load_clip_tokenizer(tok_dir if tok_dir.is_dir() else None)
    return unet, vae, text_encoder, tokenizer


# A part's weights: diffusers' names, then transformers'. Pickled ones (.bin) are never given to
# diffusers or transformers, whose torch.load does not ask for weights_only in every version the
# WebUI pins (transformers 4.30 on torch 2.1 runs a pickle's code): we read them ourselves.
SAFE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLED_WEIGHTS = ("diffusion_pytorch_model.bin", "pytorch_model.bin")


def _load_part(part: Path, cls: type, what: str, family: str = "SD1.5") -> torch.nn.Module:
    """One part of a diffusers folder: from safetensors through the library (which is told to
    use nothing else), or from a .bin through `read_state_dict`'s weights_only path."""
    names = {p.name for p in part.iterdir()} if part.is_dir() else set()
    if any(n in names or f"{n}.index.json" in names for n in SAFE_WEIGHTS):
        return cls.from_pretrained(part, local_files_only=True, use_safetensors=True)
    pickled = [part / n for n in PICKLED_WEIGHTS if n in names]
    if not pickled:
        raise ModelLoadError(f"The {what} in {part} has no weights file ({' or '.join(SAFE_WEIGHTS[:1] + PICKLED_WEIGHTS[:1])}).")
    weights = read_state_dict(pickled[0])  # refuses anything but plain tensors
    if hasattr(cls, "load_config"):  # diffusers
        module = cls.from_config(cls.load_config(part))
    else:  # transformers
        module = cls(cls.config_class.from_pretrained(part))
    _load_into(module, weights, what, ignore=("position_ids",), family=family)
    return module


def clone_backbone(backbone: DiffusersBackbone) -> DiffusersBackbone:
    """A deep copy (tests compare a trained copy with a fresh one)."""
    return copy.deepcopy(backbone)
