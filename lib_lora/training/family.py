"""Model families: every fact that differs between SD1.5 and SDXL, in one object each.

Backbones carry their family (`backbone.family`); naming, caption chunking, text encoding,
the noise schedule, sampling, metadata and presets read it from there instead of holding
constants of their own. A family is plain data (no torch, no diffusers), so any module can
import it, `lib_lora.config` included.

Where the values come from:
- kohya key prefixes, `ss_base_model_version`, `modelspec.*`: kohya-ss/sd-scripts,
  `networks/lora.py` (LORA_PREFIX_UNET / LORA_PREFIX_TEXT_ENCODER / ..._TEXT_ENCODER1/2),
  `library/model_util.py` (`get_model_version_str_for_sd1_sd2` -> "sd_v1"),
  `library/sdxl_model_util.py` (MODEL_VERSION_SDXL_BASE_V1_0 = "sdxl_base_v1-0",
  VAE_SCALE_FACTOR = 0.13025), `library/sai_model_spec.py` (ARCH_SD_V1 =
  "stable-diffusion-v1", ARCH_SD_XL_V1_BASE = "stable-diffusion-xl-v1-base", ADAPTER_LORA =
  "lora" appended as "<arch>/lora"; implementation IMPL_STABILITY_AI for SDXL LoRAs).
- SDXL's text-encoder outputs: sd-scripts `library/strategy_sdxl.py`
  (`_get_hidden_states_sdxl`: encoder 1's `hidden_states[11]` = the penultimate of 12 layers,
  encoder 2's `hidden_states[-2]`, neither through the final layer norm; the pooled output is
  encoder 2's normed last hidden state at EOS through `text_projection`, of the first chunk;
  tokenizer 2 pads with id 0), and `library/sdxl_train_util.py` ("clip_skip will be
  unexpected": SDXL ignores clip_skip).
- Schedules: the models' own scheduler configs (scaled_linear 0.00085..0.012, 1000 steps,
  epsilon, steps_offset 1), the same for SD1.5 and SDXL base.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder: its kohya prefix and which of its hidden states conditions the U-Net."""

    kohya_prefix: str  # lora_te (SD1.5) | lora_te1 / lora_te2 (SDXL)
    hidden_size: int  # width of the conditioning it gives (768 CLIP ViT-L, 1280 OpenCLIP ViT-bigG)
    layer_from_end: int = 1  # 1: the last layer, 2: the penultimate (hidden_states[-n])
    clip_skip_applies: bool = True  # the user's clip_skip picks the layer (SD1.5); SDXL ignores it
    final_layer_norm: bool = True  # the chosen hidden state goes through the final layer norm
    pooled: bool = False  # also gives the pooled (projected EOS) output
    pad_token_id: int | None = None  # None: the tokenizer's own pad id (its EOS when it has none)

    def hidden_layer(self, clip_skip: int = 1) -> int:
        """n of hidden_states[-n] for this clip_skip (1 = the last layer)."""
        return max(1, clip_skip) if self.clip_skip_applies else self.layer_from_end


@dataclass(frozen=True)
class NoiseSchedule:
    """The DDPM schedule the model was trained with (training, sample images, test samplers)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"  # diffusers' name: "epsilon" | "v_prediction"
    steps_offset: int = 1  # what the models' scheduler configs set for inference
    # Betas rescaled to zero SNR at the last timestep (Lin et al. 2023, "Common Diffusion Noise
    # Schedules and Sample Steps are Flawed"): a run's zero_terminal_snr (schedule.for_run).
    zero_terminal_snr: bool = False

    def betas(self) -> dict[str, Any]:
        """The keyword arguments every diffusers scheduler takes for this schedule."""
        return {"num_train_timesteps": self.num_train_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "beta_schedule": self.beta_schedule}  # fmt: skip


def _frozen(presets: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
    return MappingProxyType({k: MappingProxyType(dict(v)) for k, v in presets.items()})


# eq=False: a family is compared (and hashed) by identity; its preset mappings are not hashable.
@dataclass(frozen=True, eq=False)
class ModelFamily:
    name: str  # "sd15" | "sdxl": what configs, the CLI and metadata name it by
    label: str  # "SD1.5" | "SDXL": what messages and the UI show
    text_encoders: tuple[TextEncoderSpec, ...]
    latent_scale: float  # VAE latents are multiplied by this before the U-Net sees them
    base_model_version: str  # ss_base_model_version
    modelspec_architecture: str  # modelspec.architecture of a LoRA
    modelspec_implementation: str
    default_resolution: int
    bucket_range: tuple[int, int]  # (min, max) bucket side
    presets: Mapping[str, Mapping[str, Any]]
    # Extra U-Net conditioning beside the text hidden states: SDXL's pooled text embeds and its
    # size/crop time ids (original size, crop top-left, target size), as diffusers names them.
    extra_conditioning: tuple[str, ...] = ()
    chunk_length: int = 77  # CLIP's context: BOS + 75 tokens + EOS
    max_chunks: int = 3  # 225 tokens, kohya's longest max_token_length; longer captions are cut
    latent_channels: int = 4
    vae_scale_factor: int = 8  # pixels per latent side
    schedule: NoiseSchedule = NoiseSchedule()
    unet_prefix: str = "lora_unet"
    # The module naming kohya's U-Net keys use: diffusers paths (SD1.5 LoRAs) or compvis/sgm
    # paths (SDXL LoRAs: sd-scripts trains SDXL on library/sdxl_original_unet.py, sgm's layout).
    unet_key_space: str = "diffusers"
    # Whether a run trains the text encoders unless told otherwise (kohya: U-Net only for SDXL).
    default_train_text_encoder: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "presets", _frozen(self.presets))

    @property
    def tokens_per_chunk(self) -> int:
        """Caption tokens per chunk, BOS and EOS not counted (75)."""
        return self.chunk_length - 2

    @property
    def text_encoder_prefixes(self) -> tuple[str, ...]:
        return tuple(te.kohya_prefix for te in self.text_encoders)

    @property
    def pooled_text_encoder(self) -> TextEncoderSpec | None:
        return next((te for te in self.text_encoders if te.pooled), None)

    def bucket_defaults(self) -> dict[str, int]:
        """The TrainConfig values of this family's resolution and bucket range."""
        lo, hi = self.bucket_range
        return {"resolution": self.default_resolution, "min_bucket_reso": lo, "max_bucket_reso": hi}

    def config_defaults(self) -> dict[str, Any]:
        """The TrainConfig fields whose default is this family's (resolution, buckets, whether
        the text encoders train), with its values."""
        return {**self.bucket_defaults(), "train_text_encoder": self.default_train_text_encoder}

    @property
    def clip_skip_applies(self) -> bool:
        """Whether a run's clip_skip changes what the text encoders give (SD1.5: yes; SDXL: no)."""
        return any(te.clip_skip_applies for te in self.text_encoders)

    def replace(self, **changes: Any) -> ModelFamily:
        """A copy with some facts changed (tests, and a variant of a family)."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------
# SD1.5

# The recipes of the Train tab; the tutorial's is `person`.
SD15_PRESETS: dict[str, dict[str, Any]] = {
    "person": {"dim": 128, "alpha": 64.0, "lr": "auto", "optimizer": "adamw8bit", "repeats": 30, "epochs": 1,
               "lr_scheduler": "constant_with_warmup", "keep_tokens": 1},
    "character": {"dim": 64, "alpha": 32.0, "lr": "auto", "optimizer": "adamw8bit", "repeats": 20, "epochs": 2,
                  "lr_scheduler": "constant_with_warmup", "keep_tokens": 1, "shuffle_caption": True},
    "style": {"dim": 32, "alpha": 16.0, "lr": "auto", "optimizer": "adamw8bit", "repeats": 10, "epochs": 3,
              "lr_scheduler": "cosine", "keep_tokens": 0, "shuffle_caption": True},
}

SD15 = ModelFamily(
    name="sd15",
    label="SD1.5",
    # CLIP ViT-L/14; clip_skip N takes hidden_states[-N] through the final layer norm, as kohya
    # and the WebUI do (N = 1 is the plain last_hidden_state).
    text_encoders=(TextEncoderSpec("lora_te", 768),),
    latent_scale=0.18215,
    base_model_version="sd_v1",
    modelspec_architecture="stable-diffusion-v1/lora",
    # kohya's sd-scripts (library/sai_model_spec.py) writes "diffusers" for a LoRA that is not SDXL's.
    modelspec_implementation="diffusers",
    default_resolution=512,
    bucket_range=(256, 1024),
    presets=SD15_PRESETS,
)


# --------------------------------------------------------------------------------------------
# SDXL

# SDXL recipes. From kohya's "Tips for SDXL training" (sd-scripts README / docs/train_SDXL-en.md):
# the U-Net only ("--network_train_unet_only option is highly recommended for SDXL LoRA"),
# 1024x1024 ("the default resolution of SDXL"), gradient checkpointing and cached text-encoder
# outputs for 12 GB cards. Ours: the bucket range keeps SD1.5's ratio to the resolution
# (half to double); ranks are a quarter of SD1.5's: SDXL's U-Net LoRA has 722 modules and 4.5x
# the parameters per rank of SD1.5's U-Net + text-encoder LoRA (counted with naming.unet_targets
# on both full-size architectures), so a quarter of the rank keeps the file about the size of the
# SD1.5 recipe's; repeats, epochs and schedules as SD1.5's.
_SDXL_COMMON: dict[str, Any] = {"train_text_encoder": False, "resolution": 1024, "min_bucket_reso": 512,
                                "max_bucket_reso": 2048, "gradient_checkpointing": True}  # fmt: skip
SDXL_PRESETS: dict[str, dict[str, Any]] = {
    name: {**recipe, **_SDXL_COMMON, "dim": recipe["dim"] // 4, "alpha": recipe["alpha"] / 4}
    for name, recipe in SD15_PRESETS.items()
}

SDXL = ModelFamily(
    name="sdxl",
    label="SDXL",
    text_encoders=(
        # CLIP ViT-L/14: hidden_states[11] of 12 layers, no final layer norm.
        TextEncoderSpec("lora_te1", 768, layer_from_end=2, clip_skip_applies=False, final_layer_norm=False),
        # OpenCLIP ViT-bigG/14: penultimate hidden state, and the pooled output; pads with id 0.
        TextEncoderSpec("lora_te2", 1280, layer_from_end=2, clip_skip_applies=False, final_layer_norm=False,
                        pooled=True, pad_token_id=0),
    ),
    latent_scale=0.13025,
    base_model_version="sdxl_base_v1-0",
    modelspec_architecture="stable-diffusion-xl-v1-base/lora",
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    default_resolution=1024,
    bucket_range=(512, 2048),
    presets=SDXL_PRESETS,
    extra_conditioning=("text_embeds", "time_ids"),
    unet_key_space="compvis",
    default_train_text_encoder=False,
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD15, SDXL)}


def family_by_name(name: str) -> ModelFamily:
    """The family called `name` ('sd15', 'sdxl'; case and an 'sd1.5' spelling forgiven)."""
    key = str(name).strip().lower().replace(".", "").replace("-", "").replace("_", "")
    found = FAMILIES.get({"sd1": "sd15", "sdv1": "sd15"}.get(key, key))
    if found is None:
        from lib_lora.errors import UserError

        raise UserError(f"Unknown model family {name!r}; choose one of {', '.join(FAMILIES)}.")
    return found


def family_of(backbone: Any) -> ModelFamily:
    """The family a backbone carries; SD1.5 for one that names none (an older custom backbone)."""
    return getattr(backbone, "family", None) or SD15


def all_lora_prefixes() -> tuple[str, ...]:
    """Every kohya key prefix of every family (to recognise a LoRA file whatever its family)."""
    seen = dict.fromkeys(p for f in FAMILIES.values() for p in (f.unet_prefix, *f.text_encoder_prefixes))
    return tuple(seen)
