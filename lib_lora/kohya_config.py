"""kohya's training configs as ours: the kohya_ss GUI's saved .json, sd-scripts' --config_file
.toml (its command-line arguments, optionally in sections) and its --dataset_config .toml
([general], [[datasets]], [[datasets.subsets]]; docs/config_README-en.md in sd-scripts).

Each kohya key maps onto one of our fields through `TABLE`; a few keys that only mean
something together (the learning rates, epochs and steps, the network type) are read by the
rules below, which set fields the same way. Every value goes through `Import.assign`, and a
value whose field TrainConfig does not have is reported as not supported: a field added to
the schema later makes its kohya key supported without a change here. A key we have no use
for is reported too, unless it holds kohya's default or is empty, off or 0 (it sets nothing).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_lora.config import TrainConfig
from lib_lora.config_files import ConfigFile, read_data
from lib_lora.errors import UserError, shown


class Unsupported(Exception):
    """A kohya value that has no counterpart here (an optimizer we do not have)."""


UNSET = object()  # a converter's answer for a value that sets nothing ("" in the GUI's number boxes)


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def same(v: Any) -> Any:
    return UNSET if _empty(v) else v


def to_int(v: Any) -> Any:
    if _empty(v):
        return UNSET
    try:
        number = float(v)
    except (TypeError, ValueError):
        return v  # the schema's coerce names it
    return int(number) if math.isfinite(number) and number == int(number) else v


def to_float(v: Any) -> Any:
    if _empty(v):
        return UNSET
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def nonzero_int(v: Any) -> Any:
    """kohya's 'empty or 0 = off' numbers (max_train_steps) as our 'not set'."""
    v = to_int(v)
    return UNSET if v == 0 else v


def nonzero_float(v: Any) -> Any:
    v = to_float(v)
    return UNSET if v == 0 else v


def one_of(mapping: Mapping[str, str]) -> Callable[[Any], Any]:
    def convert(v: Any) -> Any:
        if _empty(v):
            return UNSET
        key = str(v).strip().lower()
        if key not in mapping:
            raise Unsupported
        return mapping[key]

    return convert


OPTIMIZERS = {"adamw8bit": "adamw8bit", "adamw": "adamw", "dadaptadam": "dadaptation", "dadaptation": "dadaptation",
              "prodigy": "prodigy"}
SCHEDULERS = {s: s for s in ("constant", "constant_with_warmup", "cosine", "linear")}
PRECISIONS = {"no": "no", "fp16": "fp16", "bf16": "bf16"}
SAVE_PRECISIONS = {"fp16": "fp16", "bf16": "bf16", "float": "fp32", "fp32": "fp32"}
CAPTION_EXTENSIONS = {".txt": ".txt", ".caption": ".caption"}
MAX_TOKENS = {"75": 75, "150": 150, "225": 225}


def max_tokens(v: Any) -> Any:
    return one_of(MAX_TOKENS)(to_int(v)) if not _empty(v) else UNSET


@dataclass(frozen=True)
class Key:
    """One kohya key: the field of ours it sets (None: none) and how its value converts."""

    target: str | None
    convert: Callable[[Any], Any] = same


# kohya key -> our field. The kohya_ss GUI and sd-scripts mostly share sd-scripts' argument
# names; where the GUI has its own (max_resolution, optimizer, epoch) both are listed.
TABLE: dict[str, Key] = {
    # model, data, output
    "pretrained_model_name_or_path": Key("base_model"),
    "train_data_dir": Key("dataset"),
    "reg_data_dir": Key("reg_data_dir"),
    "output_dir": Key("output_dir"),
    "output_name": Key("name"),
    "training_comment": Key("comment"),
    # captions and buckets
    "caption_extension": Key("caption_extension", one_of(CAPTION_EXTENSIONS)),
    "class_tokens": Key("class_tokens"),
    "shuffle_caption": Key("shuffle_caption"),
    "keep_tokens": Key("keep_tokens", to_int),
    "keep_tokens_separator": Key("keep_tokens_separator"),
    "caption_prefix": Key("caption_prefix"),
    "caption_suffix": Key("caption_suffix"),
    "caption_dropout_rate": Key("caption_dropout_rate", to_float),
    "caption_dropout_every_n_epochs": Key("caption_dropout_every_n_epochs", to_int),
    "caption_tag_dropout_rate": Key("caption_tag_dropout_rate", to_float),
    "flip_aug": Key("flip_aug"),
    "prior_loss_weight": Key("prior_loss_weight", to_float),
    "max_token_length": Key("max_token_length", max_tokens),
    "enable_bucket": Key("enable_buckets"),
    "bucket_no_upscale": Key("bucket_no_upscale"),
    "bucket_reso_steps": Key("bucket_reso_steps", to_int),
    "min_bucket_reso": Key("min_bucket_reso", to_int),
    "max_bucket_reso": Key("max_bucket_reso", to_int),
    "cache_latents_to_disk": Key("cache_latents_to_disk"),
    "num_repeats": Key("repeats", to_int),
    "dataset_repeats": Key("repeats", to_int),
    # steps
    "train_batch_size": Key("batch_size", to_int),
    "batch_size": Key("batch_size", to_int),
    "max_train_steps": Key("max_steps", nonzero_int),
    # network (network_module / LoRA_type / network_args: `network_rules`)
    "network_dim": Key("dim", to_int),
    "network_alpha": Key("alpha", to_float),
    "network_dropout": Key("network_dropout", to_float),
    "rank_dropout": Key("rank_dropout", to_float),
    "module_dropout": Key("module_dropout", to_float),
    # optimisation (learning rates: `lr_rules`)
    "optimizer_type": Key("optimizer", one_of(OPTIMIZERS)),
    "optimizer": Key("optimizer", one_of(OPTIMIZERS)),
    "lr_scheduler": Key("lr_scheduler", one_of(SCHEDULERS)),
    "lr_warmup_steps": Key("lr_warmup_steps", to_float),
    "max_grad_norm": Key("max_grad_norm", to_float),
    "noise_offset": Key("noise_offset", to_float),
    "noise_offset_random_strength": Key("noise_offset_random_strength"),
    "multires_noise_iterations": Key("multires_noise_iterations", to_int),
    "multires_noise_discount": Key("multires_noise_discount", to_float),
    "min_snr_gamma": Key("min_snr_gamma", nonzero_float),
    "clip_skip": Key("clip_skip", to_int),
    "v_parameterization": Key("v_parameterization"),
    "zero_terminal_snr": Key("zero_terminal_snr"),
    "loss_type": Key("loss_type"),
    "huber_schedule": Key("huber_schedule"),
    "huber_c": Key("huber_c", to_float),
    "min_timestep": Key("min_timestep", to_int),
    "max_timestep": Key("max_timestep", to_int),
    "masked_loss": Key("masked_loss"),
    # machine
    "mixed_precision": Key("mixed_precision", one_of(PRECISIONS)),
    "seed": Key("seed", nonzero_int),  # kohya: empty or 0 = a random seed; ours stays fixed
    "gradient_checkpointing": Key("gradient_checkpointing"),
    # saving and samples
    "save_precision": Key("save_precision", one_of(SAVE_PRECISIONS)),
    "save_every_n_steps": Key("save_every_n_steps", to_int),
    "save_every_n_epochs": Key("save_every_n_epochs", to_int),
    "sample_every_n_steps": Key("sample_every_n_steps", to_int),
    "sample_every_n_epochs": Key("sample_every_n_epochs", to_int),
}

# Keys the rules below read (never reported by the plain table walk).
RULE_KEYS = frozenset({
    "learning_rate", "unet_lr", "text_encoder_lr", "network_train_unet_only", "network_train_text_encoder_only",
    "max_train_epochs", "epoch", "lr_warmup", "network_module", "network_args", "LoRA_type", "conv_dim",
    "conv_alpha", "factor", "dora_wd", "resolution", "max_resolution", "noise_offset_type", "optimizer_args",
    "use_8bit_adam", "dataset_config",
})  # fmt: skip

# Keys with no field here whose value changes nothing about the trained LoRA (how kohya
# launches, which attention kernel computes the same product, where it caches), or values of
# kohya keys that are its defaults: neither is reported.
NO_EFFECT = frozenset({
    "cache_latents", "xformers", "sdpa", "mem_eff_attn", "max_data_loader_n_workers",
    "persistent_data_loader_workers", "num_cpu_threads_per_process", "gpu_ids", "multi_gpu", "num_processes",
    "num_machines", "main_process_port", "dynamo_backend", "dynamo_mode", "dynamo_use_fullgraph",
    "dynamo_use_dynamic", "extra_accelerate_launch_args", "model_list", "vae_batch_size", "lowram", "highvram",
    "sdxl", "sdxl_no_half_vae", "no_half_vae", "log_config", "wandb_api_key", "wandb_run_name", "log_tracker_name",
    "log_tracker_config", "log_with", "log_prefix", "save_state", "save_state_on_train_end", "skip_cache_check",
    "async_upload", "cache_info",
    # Ours caches text-encoder outputs whenever that gives the same result (the encoder frozen):
    # kohya's switch (off by default) would only slow a run here.
    "cache_text_encoder_outputs", "sdxl_cache_text_encoder_outputs",
})  # fmt: skip
KOHYA_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "save_model_as": ("safetensors",), "lr_scheduler_num_cycles": (1, "1"), "lr_scheduler_power": (1, 1.0, "1"),
    "gradient_accumulation_steps": (1, "1"), "LyCORIS_preset": ("full",), "unit": (1, "1"), "factor": (-1, "-1"),
    "noise_offset_type": ("Original",), "sample_sampler": ("euler_a", "ddim"), "huber_c": (0.1,),
    "huber_schedule": ("snr",), "loss_type": ("l2",), "max_timestep": (1000,), "prior_loss_weight": (1, 1.0),
    "multires_noise_discount": (0.3,), "huber_scale": (1, 1.0), "caption_extension": (".caption", ".txt"),
    "min_bucket_reso": (256,), "max_bucket_reso": (1024, 2048), "bucket_reso_steps": (64,),
    "train_on_input": (True,), "t5xxl_dtype": ("bf16",), "logit_std": (1, 1.0), "mode_scale": (1.29,),
    "discrete_flow_shift": (3, 3.0), "guidance_scale": (3.5,), "weighting_scheme": ("logit_normal",),
    "timestep_sampling": ("sigma",), "model_prediction_type": ("sigma_scaled",), "sd3_text_encoder_batch_size": (1,),
    "t5xxl_max_token_length": (512,), "train_blocks": ("all",), "optimizer_args": ("decouple=True",),
    "max_token_length": (75, "75"), "rank_dropout_scale": (False,), "constrain": (0, 0.0), "rescaled": (False,),
}  # fmt: skip


def kohya_keys() -> frozenset[str]:
    """Every key this module knows as kohya's (a file with one that is not ours is kohya's)."""
    return frozenset(TABLE) | RULE_KEYS | NO_EFFECT | frozenset(KOHYA_DEFAULTS)


def sets_nothing(key: str, value: Any) -> bool:
    """Whether a key we cannot use held only a value that changes nothing."""
    if key in NO_EFFECT or value is None or value is False or value == [] or value == {}:
        return True
    if isinstance(value, str) and value.strip() in ("", "0", "0.0", "None", "none"):
        return True
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return True
    return value in KOHYA_DEFAULTS.get(key, ())


@dataclass
class Import:
    """One import: the fields set so far and what could not be used."""

    fields: frozenset[str]
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    unsupported: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def assign(self, target: str | None, value: Any, key: str, raw: Any = UNSET) -> None:
        """Set our field `target` from kohya's `key`, or report the key when we have no such field."""
        raw = value if raw is UNSET else raw
        if target is not None and target in self.fields:
            self.values[target] = value
        elif not sets_nothing(key, raw):
            self.drop(key, raw)

    def drop(self, key: str, raw: Any) -> None:
        self.drop_entry(f"{key} = {_shown(raw)}")

    def drop_entry(self, entry: str) -> None:
        if entry not in self.unsupported:
            self.unsupported.append(entry)


    def use(self, key: str, raw: Any, table: Mapping[str, Key]) -> None:
        """A plain key through `table`."""
        rule = table.get(key)
        if rule is None:
            if not sets_nothing(key, raw):
                self.drop(key, raw)
            return
        try:
            value = rule.convert(raw)
        except Unsupported:
            self.drop(key, raw)
            return
        if value is not UNSET:
            self.assign(rule.target, value, key, raw)


def _shown(v: Any) -> str:
    # As the file writes it (true, not True).
    return "true" if v is True else "false" if v is False else shown(v)


def flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    """sd-scripts' --config_file may group its keys in sections; it reads them as one table."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(v)
        else:
            out[k] = v
    return out


def _number(v: Any) -> float | None:
    if _empty(v) or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def lr_rules(d: Mapping[str, Any], imp: Import, gui: bool) -> None:
    """The learning rates. kohya: a missing U-Net or text-encoder lr is `learning_rate` (ours
    would be 0.1 x for the text encoder, so it is set explicitly); sd-scripts skips a part whose
    lr is 0; the GUI trains the U-Net only when the text-encoder lr is 0 and the U-Net's is not
    (and the text encoder only the other way round), both at learning_rate when both are 0."""
    base = _number(d.get("learning_rate"))
    unet, te = _number(d.get("unet_lr")), d.get("text_encoder_lr")
    if isinstance(te, list):  # sd-scripts: one per text encoder (SDXL); ours is one value
        te = te[0] if te else None
    te = _number(te)
    train_unet = train_te = True
    if gui:
        unet0, te0 = not unet, not te
        if te0 and not unet0:
            train_te = False
        if unet0 and not te0:
            train_unet = False
        unet, te = (unet or None), (te or None)
    else:
        if unet == 0:
            train_unet, unet = False, None
        if te == 0:
            train_te, te = False, None
    if d.get("network_train_unet_only") in (True, "true", "True"):
        train_te = False
    if d.get("network_train_text_encoder_only") in (True, "true", "True"):
        train_unet = False
    unet_lr = unet if unet is not None else base
    te_lr = te if te is not None else base
    if unet_lr is not None:
        imp.assign("lr", repr(unet_lr), "unet_lr" if unet is not None else "learning_rate")
    if te_lr is not None and train_te:
        imp.assign("text_encoder_lr", te_lr, "text_encoder_lr" if te is not None else "learning_rate")
    if not train_te:
        imp.assign("train_text_encoder", False, "network_train_unet_only", True)
    if not train_unet:
        imp.assign("train_unet", False, "network_train_text_encoder_only", True)


def step_rules(d: Mapping[str, Any], imp: Import, gui: bool) -> None:
    """Epochs and steps: max_train_epochs wins over max_train_steps (as in sd-scripts); the
    GUI's `epoch` box counts when neither is set."""
    epochs = nonzero_int(d.get("max_train_epochs"))
    if epochs is not UNSET:
        imp.assign("epochs", epochs, "max_train_epochs", d.get("max_train_epochs"))
        imp.values.pop("max_steps", None)
    elif gui and nonzero_int(d.get("epoch")) is not UNSET:
        imp.assign("epochs", nonzero_int(d.get("epoch")), "epoch", d.get("epoch"))
    if gui and nonzero_int(d.get("lr_warmup_steps")) is UNSET and _number(d.get("lr_warmup")):
        pct = _number(d.get("lr_warmup")) or 0.0  # the GUI's warm-up box is a percentage of the steps
        imp.assign("lr_warmup_steps", min(pct, 99.0) / 100, "lr_warmup", d.get("lr_warmup"))


GUI_NETWORKS = {"Standard": "lora", "Kohya LoCon": "lora", "LoCon": "locon", "LyCORIS/LoCon": "locon",
                "LyCORIS/LoHa": "loha", "LyCORIS/LoKr": "lokr"}
LYCORIS_ALGOS = {"locon": "locon", "lora": "locon", "loha": "loha", "lokr": "lokr"}
NETWORK_ARGS = {"conv_dim": Key("conv_dim", to_int), "conv_alpha": Key("conv_alpha", to_float),
                "rank_dropout": Key("rank_dropout", to_float), "module_dropout": Key("module_dropout", to_float),
                "factor": Key("lokr_factor", to_int), "dropout": Key("network_dropout", to_float)}


def _parse_args(v: Any) -> list[tuple[str, str]]:
    """network_args / optimizer_args: a list of 'k=v' (sd-scripts) or one string of them (the GUI)."""
    items = v if isinstance(v, list) else str(v or "").replace('"', "").split()
    out = []
    for item in items:
        k, _, val = str(item).partition("=")
        if k.strip():
            out.append((k.strip(), val.strip()))
    return out


def network_rules(d: Mapping[str, Any], imp: Import, gui: bool) -> None:
    kind: str | None = "lora"
    args = dict(_parse_args(d.get("network_args")))
    if gui:
        lora_type = str(d.get("LoRA_type") or "Standard")
        kind = GUI_NETWORKS.get(lora_type)
        if kind is None:
            imp.drop("LoRA_type", lora_type)
        if lora_type != "Standard":  # the GUI passes conv dims (and LoKr's factor) for these types only
            for key in ("conv_dim", "conv_alpha") + (("factor",) if kind == "lokr" else ()):
                if key in d:
                    args.setdefault(key, d[key])
        dora = d.get("dora_wd") in (True, "true", "True")
    else:
        module = str(d.get("network_module") or "networks.lora")
        if module == "lycoris.kohya":
            algo = str(args.get("algo", "lora")).lower()
            kind = LYCORIS_ALGOS.get(algo)
            if kind is None:
                imp.drop("network_args", f"algo={algo}")
        elif module != "networks.lora":
            kind = None
            imp.drop("network_module", module)
        dora = str(args.get("dora_wd", "")).lower() == "true"
    args.pop("algo", None)
    args.pop("dora_wd", None)
    if kind == "locon" and dora:
        kind = "dora"
    if kind is not None:
        imp.assign("network_type", kind, "LoRA_type" if gui else "network_module")
    for k, v in args.items():
        key = k if gui and k in d else f"network_args {k}"
        rule = NETWORK_ARGS.get(k)
        if rule is not None:
            _use_as(imp, key, v, rule)
        elif not sets_nothing(k, v):
            imp.drop(key, v)


def _use_as(imp: Import, key: str, raw: Any, rule: Key) -> None:
    value = rule.convert(raw)
    if value is not UNSET:
        imp.assign(rule.target, value, key, raw)


def optimizer_rules(d: Mapping[str, Any], imp: Import) -> None:
    if d.get("use_8bit_adam") in (True, "true", "True"):
        imp.assign("optimizer", "adamw8bit", "use_8bit_adam", True)
    for k, v in _parse_args(d.get("optimizer_args")):
        if k == "weight_decay":
            _use_as(imp, "optimizer_args weight_decay", v, Key("weight_decay", to_float))
        elif not (k == "decouple" and v.lower() == "true"):  # ours decouple the weight decay too
            imp.drop(f"optimizer_args {k}", v)


def resolution_of(v: Any) -> tuple[int, int] | None:
    """kohya's resolution: 512, "512", "512,768" or [512, 768] as (width, height)."""
    parts = v if isinstance(v, list | tuple) else str(v).replace(" ", "").split(",")
    try:
        nums = [int(float(p)) for p in parts]
    except (TypeError, ValueError):
        return None
    if len(nums) == 1:
        nums *= 2
    return (nums[0], nums[1]) if len(nums) == 2 else None


def resolution_rule(key: str, v: Any, imp: Import) -> None:
    if _empty(v):
        return
    size = resolution_of(v)
    if size is None:
        imp.drop(key, v)
        return
    w, h = size
    side = w if w == h else round(math.sqrt(w * h))
    if w != h:  # ours trains a square's area, in buckets of any shape
        imp.notes.append(f"{key} {w}x{h} is not square: training at {side} (buckets of the same area).")
    imp.assign("resolution", side, key, v)


def noise_rules(d: dict[str, Any], gui: bool) -> None:
    """The GUI passes only the noise of the chosen kind: drop the other kind's boxes."""
    if not gui:
        return
    kind = d.get("noise_offset_type", "Original")
    unused = ("multires_noise_iterations", "multires_noise_discount") if kind == "Original" else \
        ("noise_offset", "noise_offset_random_strength")
    for k in unused:
        d.pop(k, None)


def import_args(data: Mapping[str, Any], kind: str, imp: Import, path: Path) -> None:
    """A kohya_ss GUI .json or an sd-scripts --config_file .toml into `imp`."""
    d = flatten(data)
    gui = kind == "kohya_ss"
    noise_rules(d, gui)
    for key, v in d.items():
        if key in RULE_KEYS:
            continue
        imp.use(key, v, TABLE)
    lr_rules(d, imp, gui)
    step_rules(d, imp, gui)
    network_rules(d, imp, gui)
    optimizer_rules(d, imp)
    for key in ("max_resolution", "resolution"):
        if key in d:
            resolution_rule(key, d[key], imp)
    dataset_file = d.get("dataset_config")
    if not _empty(dataset_file):
        # sd-scripts: with a dataset config, train_data_dir and reg_data_dir are ignored.
        for k in ("dataset", "reg_data_dir"):
            imp.values.pop(k, None)
        imp.unsupported = [u for u in imp.unsupported if not u.startswith(("train_data_dir ", "reg_data_dir "))]
        sub = Path(str(dataset_file))
        import_dataset(read_data(sub), imp, sub)


# ------------------------------------------------------------------- sd-scripts --dataset_config

DATASET_KEYS = ("resolution", "batch_size", "enable_bucket", "bucket_no_upscale", "bucket_reso_steps",
                "min_bucket_reso", "max_bucket_reso")
# kohya subset option -> the key of our `subsets` entries (each names a run-level field too,
# whose value an entry without the key takes: the rule that decides whether it is supported).
SUBSET_KEYS = {"image_dir": "image_dir", "num_repeats": "repeats", "is_reg": "is_reg", "class_tokens": "class_tokens",
               "caption_extension": "caption_extension", "keep_tokens": "keep_tokens",
               "keep_tokens_separator": "keep_tokens_separator", "shuffle_caption": "shuffle_caption",
               "caption_dropout_rate": "caption_dropout_rate",
               "caption_dropout_every_n_epochs": "caption_dropout_every_n_epochs",
               "caption_tag_dropout_rate": "caption_tag_dropout_rate", "caption_prefix": "caption_prefix",
               "caption_suffix": "caption_suffix", "flip_aug": "flip_aug"}  # fmt: skip
SUBSET_ONLY = ("image_dir", "is_reg")  # no run-level field: they exist with `subsets` itself


def subset_supported(our_key: str, fields: frozenset[str]) -> bool:
    return "subsets" in fields and (our_key in SUBSET_ONLY or our_key in fields)


def import_dataset(data: Mapping[str, Any], imp: Import, path: Path) -> None:
    """[general] < [[datasets]] < [[datasets.subsets]], as sd-scripts resolves them. One dataset
    per run here (one resolution and batch size); its subsets become `subsets` entries, or with
    a single image folder, the run's own dataset fields."""
    general = dict(data.get("general") or {})
    datasets = [dict(x) for x in data.get("datasets") or [] if isinstance(x, dict)]
    for k in data:
        if k not in ("general", "datasets"):
            imp.drop(k, data[k])
    if not datasets:
        raise UserError(f"The dataset config {path} has no [[datasets]] table; add one with its [[datasets.subsets]].")
    first = datasets[0]
    for i, extra in enumerate(datasets[1:], start=2):
        imp.drop_entry(f"[[datasets]] #{i} with {len(extra.get('subsets') or [])} subset(s) (one dataset per run here)")
    options = {k: v for k, v in {**general, **first}.items() if k != "subsets"}
    for k in DATASET_KEYS:
        if k in options:
            if k == "resolution":
                resolution_rule(k, options[k], imp)
            else:
                imp.use(k, options[k], TABLE)
    inherited = {k: v for k, v in options.items() if k not in DATASET_KEYS}
    subsets = [{**inherited, **s} for s in first.get("subsets") or [] if isinstance(s, dict)]
    if not subsets:
        raise UserError(f"The dataset config {path} has no [[datasets.subsets]]; add one with its image_dir.")
    for s in subsets:
        s.setdefault("num_repeats", 1)  # sd-scripts' default (ours is 10)
    single = len(subsets) == 1 and not subsets[0].get("is_reg")
    if single or "subsets" not in imp.fields:
        if not single:  # several folders, or regularisation images: only with `subsets`
            imp.drop_entry(f"{len(subsets)} [[datasets.subsets]] (several image folders or regularisation "
                           "images need the subsets option)")
            first_train = next((s for s in subsets if not s.get("is_reg")), subsets[0])
            imp.notes.append(f"Training on the first subset only ({first_train.get('image_dir')}).")
            subsets = [first_train]
        _subset_as_run(subsets[0], imp)
        return
    entries = []
    for n, s in enumerate(subsets, start=1):
        entry = {}
        for k, v in s.items():
            ours = SUBSET_KEYS.get(k)
            if ours is not None and subset_supported(ours, imp.fields):
                rule = TABLE.get(k, Key(ours))
                try:
                    value = rule.convert(v)
                except Unsupported:
                    imp.drop(f"datasets.subsets #{n} {k}", v)
                    continue
                if value is not UNSET:
                    entry[ours] = value
            elif not sets_nothing(k, v):
                imp.drop(f"datasets.subsets #{n} {k}", v)
        entries.append(entry)
    imp.assign("subsets", entries, "[[datasets.subsets]]")


def _subset_as_run(s: Mapping[str, Any], imp: Import) -> None:
    for k, v in s.items():
        if k == "image_dir":
            imp.assign("dataset", str(v), k)
        elif k == "is_reg":
            if v:
                imp.drop(k, v)
        else:
            imp.use(k, v, TABLE)


# ----------------------------------------------------------------------------------- entry


@functools.cache
def _fields() -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(TrainConfig))


def import_kohya(data: Mapping[str, Any], kind: str, path: Path,
                 fields: frozenset[str] | None = None) -> ConfigFile:
    """kohya's file as our fields, with what is not supported named. `fields` are the fields
    that exist (TrainConfig's): a value for any other is reported, never set."""
    imp = Import(fields if fields is not None else _fields())
    if kind == "sd-scripts-dataset":
        import_dataset(data, imp, path)
    else:
        import_args(data, kind, imp, path)
    return ConfigFile(path, kind, imp.values, imp.unsupported, imp.notes)
