"""The LoRA file's metadata: kohya's `ss_*` keys, the `modelspec.*` keys and our `fastlora_*` keys.

Readers depend on it: A1111 shows it on the LoRA card and files without it are listed as an
"Unknown" version (hidden by a default filter). All values are strings. `sshs_model_hash` and
`sshs_legacy_hash` are added by `export.write_lora`, over the tensors and these ss_ keys.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lib_lora
from lib_lora.config import to_dict
from lib_lora.training.family import SD15, ModelFamily
from lib_lora.training.loss import HUBER_SCALE

if TYPE_CHECKING:
    from lib_lora.config import TrainConfig
    from lib_lora.training.data import StepPlan

# The modelspec version kohya's sd-scripts (library/sai_model_spec.py) writes; the architecture
# and implementation values are the family's.
MODELSPEC_VERSION = "1.0.1"

# The keys REFERENCE §2 requires; tests check every one is present.
REQUIRED_KEYS = (
    "ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
    "ss_v2", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_optimizer", "ss_lr_scheduler",
    "ss_num_train_images", "ss_num_epochs", "ss_max_train_steps", "ss_steps", "ss_batch_size_per_device",
    "ss_resolution", "ss_mixed_precision", "ss_clip_skip", "ss_seed", "ss_training_started_at",
    "ss_training_finished_at", "ss_dataset_dirs", "ss_tag_frequency", "ss_sd_model_name",
    "ss_new_sd_model_hash", "modelspec.architecture", "modelspec.title", "modelspec.date",
    "modelspec.resolution", "modelspec.prediction_type",
)  # fmt: skip


@dataclass
class RunInfo:
    """What only the run knows (the config and the plan give the rest)."""

    started_at: float  # time.time()
    unet_lr: float
    text_encoder_lr: float
    optimizer: str  # class actually stepping, e.g. torch.optim.adamw.AdamW
    optimizer_args: str
    mixed_precision: str  # fp16 | bf16 | no
    model_name: str
    model_hash: str  # sha256 of the base model file ('' when unknown)
    session_id: str
    steps: int = 0
    epoch: int = 0
    finished_at: float | None = None
    warmup_steps: int = 0
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    bucket_info: dict[str, Any] | None = None  # data.bucket_info: kohya's ss_bucket_info
    model_legacy_hash: str = ""  # the WebUI's old 8-hex hash of the base model file ('' when unknown)
    extra: dict[str, str] = field(default_factory=dict)  # later phases (LR probe...) add keys here


def _s(v: Any) -> str:
    return "None" if v is None else str(v)


def build_metadata(cfg: TrainConfig, plan: StepPlan, run: RunInfo, family: ModelFamily = SD15) -> dict[str, str]:
    """Every metadata key, as strings; the base-model and modelspec values are the family's."""
    dataset_dirs = {s["folder"]: {"n_repeats": s["repeats"], "img_count": s["images"]}
                    for s in plan.subsets if not s.get("is_reg")}
    reg_dataset_dirs = {s["folder"]: {"n_repeats": s["repeats"], "img_count": s["images"]}
                        for s in plan.subsets if s.get("is_reg")}
    network_args = {}
    network_module = "networks.lora"
    if cfg.network_type != "lora":
        from lib_lora.training.lycoris_net import network_args as lycoris_network_args

        network_module = "lycoris.kohya"
        network_args = lycoris_network_args(cfg.network_type, cfg.conv_dim, cfg.conv_alpha,
                                            cfg.network_dropout, cfg.lokr_factor)
    else:
        if cfg.conv_dim:
            network_args = {"conv_dim": str(cfg.conv_dim), "conv_alpha": str(cfg.conv_alpha)}
        if cfg.network_dropout:
            network_args["dropout"] = str(cfg.network_dropout)
    # sd-scripts takes both as --network_args (for networks.lora and lycoris.kohya alike) and
    # records them there, only when given.
    if cfg.rank_dropout:
        network_args["rank_dropout"] = str(cfg.rank_dropout)
    if cfg.module_dropout:
        network_args["module_dropout"] = str(cfg.module_dropout)
    finished = run.finished_at
    # kohya writes its --clip_skip as given ("None" by default) and modelspec.encoder_layer only
    # for one given. Its SDXL training ignores the value (library/sdxl_train_util.py warns "clip_skip
    # will be unexpected"; strategy_sdxl.py always takes the penultimate layers), and its SDXL
    # recipe gives none: so an SDXL LoRA of ours says "None" and no encoder layer, what kohya
    # writes for the SDXL LoRAs trained as it advises, and what the run did whatever the field said.
    clip_skip = cfg.clip_skip if family.clip_skip_applies and cfg.clip_skip > 1 else None
    # kohya's modelspec.date: local time to the second, ISO 8601 without an offset.
    date = dt.datetime.fromtimestamp(int(finished or run.started_at))
    md: dict[str, Any] = {
        "ss_session_id": run.session_id,
        "ss_training_started_at": run.started_at,
        "ss_training_finished_at": finished,
        "ss_output_name": cfg.name,
        "ss_training_comment": cfg.comment or "None",
        "ss_sd_model_name": run.model_name,
        "ss_new_sd_model_hash": run.model_hash,
        # kohya's get_model_version_str_for_sd1_sd2 adds "_v" for v-prediction (SD1/SD2 only).
        "ss_base_model_version": family.base_model_version + ("_v" if cfg.v_parameterization and family.name == "sd15" else ""),
        "ss_v2": False,
        "ss_network_module": network_module,
        "ss_network_dim": cfg.dim,
        "ss_network_alpha": cfg.alpha,
        "ss_network_dropout": cfg.network_dropout,
        "ss_learning_rate": run.unet_lr,
        "ss_unet_lr": run.unet_lr if cfg.train_unet else "None",
        "ss_text_encoder_lr": run.text_encoder_lr if cfg.train_text_encoder else "None",
        "ss_network_train_unet_only": not cfg.train_text_encoder,
        "ss_network_train_text_encoder_only": not cfg.train_unet,
        # Only arguments that differ from the optimizer's defaults (optim.given_args), as kohya.
        "ss_optimizer": f"{run.optimizer}({run.optimizer_args})" if run.optimizer_args else run.optimizer,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": run.warmup_steps,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_num_train_images": plan.images_with_repeats,
        "ss_num_reg_images": plan.reg_images,
        "ss_num_batches_per_epoch": plan.steps_per_epoch,
        "ss_num_epochs": plan.epochs,
        "ss_epoch": run.epoch,
        "ss_max_train_steps": plan.total_steps,
        "ss_steps": run.steps,
        "ss_batch_size_per_device": cfg.batch_size,
        "ss_total_batch_size": cfg.batch_size,
        "ss_gradient_accumulation_steps": 1,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_enable_bucket": cfg.enable_buckets,
        "ss_bucket_no_upscale": cfg.bucket_no_upscale,
        "ss_min_bucket_reso": cfg.min_bucket_reso,
        "ss_max_bucket_reso": cfg.max_bucket_reso,
        "ss_bucket_info": json.dumps(run.bucket_info),
        "ss_cache_latents": True,
        "ss_mixed_precision": run.mixed_precision,
        "ss_full_fp16": False,
        # kohya writes None for no skip (its default), and the WebUI's card shows no "Clip skip" then.
        "ss_clip_skip": clip_skip,
        "ss_seed": cfg.seed,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": cfg.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": cfg.caption_tag_dropout_rate,
        "ss_flip_aug": cfg.flip_aug,
        "ss_color_aug": False,
        "ss_random_crop": False,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_noise_offset": cfg.noise_offset if cfg.noise_offset else "None",
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        # The loss and noise options, as kohya's train_network.py writes them.
        "ss_zero_terminal_snr": cfg.zero_terminal_snr,
        "ss_multires_noise_iterations": cfg.multires_noise_iterations or None,
        "ss_multires_noise_discount": cfg.multires_noise_discount,
        "ss_noise_offset_random_strength": cfg.noise_offset_random_strength,
        "ss_loss_type": cfg.loss_type,
        "ss_huber_schedule": cfg.huber_schedule,
        "ss_huber_scale": HUBER_SCALE,
        "ss_huber_c": cfg.huber_c,
        # kohya's max_token_length takes 150 or 225; its default (None) is 75 tokens.
        "ss_max_token_length": cfg.max_token_length if cfg.max_token_length > 75 else None,
        "ss_dataset_dirs": json.dumps(dataset_dirs, ensure_ascii=False),
        "ss_reg_dataset_dirs": json.dumps(reg_dataset_dirs, ensure_ascii=False),
        "ss_tag_frequency": json.dumps(run.tag_frequency, ensure_ascii=False),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.implementation_version": f"fast-lora/{getattr(lib_lora, '__version__', '0')}",
        "modelspec.title": cfg.name,
        "modelspec.date": date.isoformat(),
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.prediction_type": "v" if cfg.v_parameterization else family.schedule.prediction_type,
        "fastlora_version": getattr(lib_lora, "__version__", "0"),
        "fastlora_config": json.dumps(to_dict(cfg), ensure_ascii=False, sort_keys=True),
        "fastlora_plan": json.dumps(
            {k: v for k, v in plan.to_dict().items() if k != "skipped"}, ensure_ascii=False, sort_keys=True
        ),
    }
    if network_args:  # kohya writes the key only for network arguments given
        md["ss_network_args"] = json.dumps(network_args)
    if run.model_legacy_hash:  # kohya writes it only for a model file it could read
        md["ss_sd_model_hash"] = run.model_legacy_hash
    if clip_skip is not None:
        md["modelspec.encoder_layer"] = str(clip_skip)
    if (cfg.min_timestep, cfg.max_timestep) != (0, family.schedule.num_train_timesteps):  # kohya: when given
        md["modelspec.timestep_range"] = f"{cfg.min_timestep},{cfg.max_timestep}"
    if cfg.comment:
        md["modelspec.description"] = cfg.comment
    md.update(run.extra)
    return {k: _s(v) for k, v in md.items()}


def summary(metadata: dict[str, str]) -> str:
    """A few lines for people: what was trained, on what, how long."""
    keys = [
        ("name", "ss_output_name"), ("base model", "ss_sd_model_name"), ("steps", "ss_steps"),
        ("images x repeats", "ss_num_train_images"), ("dim/alpha", None), ("lr (U-Net/TE)", None),
        ("optimizer", "ss_optimizer"), ("scheduler", "ss_lr_scheduler"), ("precision", "ss_mixed_precision"),
        ("resolution", "modelspec.resolution"), ("hash", "sshs_model_hash"),
    ]  # fmt: skip
    lines = []
    for label, key in keys:
        if label == "dim/alpha":
            value = f"{metadata.get('ss_network_dim')}/{metadata.get('ss_network_alpha')}"
        elif label == "lr (U-Net/TE)":
            value = f"{metadata.get('ss_unet_lr')}/{metadata.get('ss_text_encoder_lr')}"
        else:
            value = metadata.get(key, "")
        if value:
            lines.append(f"  {label:17} {value}")
    return "\n".join(lines)
