"""The training loop: `train(cfg)` runs one LoRA training from a config to a LoRA file.

The `Trainer` keeps the phases apart so later work can slot in: `setup()` (run folder, data,
model, latents, network, optimizer, logs), `resolve_lr()` (the LR probe hooks in here),
`train_step()` (one optimisation step, no host sync), `save_lora()` / `save_checkpoint()`,
and `run()` which strings them together. Events go to `on_event` as dicts:
'phase' {text}, 'plan' {StepPlan fields, text}, 'loss' {step, loss, average, lr},
'saved' {path, step}, 'done' {lora_path, steps, final_loss, seconds, seconds_per_step}.
The progress text is the current phase's label only ("caching latents", "LR probe",
"training", "making samples", ...): numbers such as the loss travel in the events.

A Trainer holds the config (never replaced), where events go (`events`, a RunEvents) and the
run's mutable state (`state`, a RunState: training/run_state.py). The step guard, the LR probe
and the resumable state are functions over that state (guards.py, probe.py, state.py); they
receive what they use from here and never import this module.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lib_lora.atomic import atomic_write_json, writable_folder
from lib_lora.config import TrainConfig, to_dict, validate
from lib_lora.errors import Cancelled, UserError, file_error, is_file_error
from lib_lora.names import lora_output_file, validate_name
from lib_lora.progress import Progress, check_cancel
from lib_lora.training import data as data_mod
from lib_lora.training import distributed, guards, probe, speed
from lib_lora.training import loss as loss_mod
from lib_lora.training import noise as noise_mod
from lib_lora.training import sample as sample_mod
from lib_lora.training import state as state_mod
from lib_lora.training.backbone import Backbone
from lib_lora.training.family import SD15, family_of
from lib_lora.training.metadata import RunInfo, build_metadata
from lib_lora.training.optim import (
    group_lrs,
    lr_plan,
    make_optimizer,
    make_scheduler,
    param_groups,
    text_encoder_lr,
    warmup_steps,
)
from lib_lora.training.run_config import config_family, family_note, training_precision
from lib_lora.training.run_state import RunEvents, RunState, release_run_only
from lib_lora.training.schedule import for_run, training_schedule

log = logging.getLogger(__name__)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CHART_POINTS = 50  # a run's loss events: at least this many, or one per step for a shorter run
TRAINING = "training"  # the progress label of the training steps


def chart_every(total_steps: int, log_every_n_steps: int) -> int:
    """Steps between two 'loss' events (the live chart's points). TensorBoard keeps the
    user's `log_every_n_steps`; the chart reads the loss more often in a short run, so that a
    30-step run draws 30 points instead of the 3 of a 10-step cadence."""
    return max(1, min(log_every_n_steps, total_steps // CHART_POINTS))


@dataclass
class TrainResult:
    lora_path: Path
    run_dir: Path
    steps: int
    final_loss: float
    metadata: dict[str, str] = field(default_factory=dict)


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(cfg.device)
    except RuntimeError:
        raise UserError(f"device = {cfg.device!r}: use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device = cuda, but no CUDA GPU is available here; set --device to cpu or auto.")
    return dev


def run_folder(cfg: TrainConfig, name: str) -> Path:
    """Where a run keeps its config, logs, checkpoints and resumable state."""
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / name


def sample_time_ids(items: list[data_mod.Item], flips: list[bool] | None = None) -> torch.Tensor:
    """(B, 6) SDXL time ids of a batch from one bucket: each image's original size, its crop's
    top-left (of a mirrored sample, measured from the right as kohya does) and the bucket
    (backbone_sdxl.bucket_time_ids, as kohya computes them)."""
    from lib_lora.training.backbone_sdxl import bucket_time_ids

    return bucket_time_ids([it.size for it in items], items[0].bucket, flips or None)


def predict_with(predict: Callable, bb: Backbone, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                 pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> torch.Tensor:
    """The U-Net's prediction in the backbone's dtype; with the added conditioning (pooled text
    embedding and time ids) for a family that has it (SDXL)."""
    if time_ids is None:
        return predict(noisy.to(bb.dtype), t, cond.to(bb.dtype))
    from lib_lora.training.backbone_sdxl import added_conditions

    return predict(noisy.to(bb.dtype), t, cond.to(bb.dtype), added_conditions(pooled.to(bb.dtype), time_ids))


def _target_name(t: Any) -> str:
    return t.name if hasattr(t, "name") else t[0]


class Trainer:
    __slots__ = ("cfg", "events", "state")  # everything a run changes is in `state`

    def __init__(
        self,
        cfg: TrainConfig,
        backbone: Backbone | None = None,
        progress: Progress | None = None,
        on_event: Callable[[dict], None] | None = None,
        procs: distributed.Processes | None = None,
    ) -> None:
        self.cfg = validate(cfg)  # never replaced: what trains with other settings gets them passed
        self.events = RunEvents(on_event, progress)
        self.state = RunState(backbone=backbone, procs=procs or distributed.Processes())

    @property
    def progress(self) -> Progress | None:
        return self.events.progress

    # ---------------------------------------------------------------- events
    def emit(self, kind: str, **fields: Any) -> None:
        self.events.emit(kind, **fields)

    def phase(self, text: str) -> None:
        self.events.phase(text)

    def warn(self, text: str) -> None:
        """A phase line that is a warning: printed like any phase by the CLI, shown in the UI's
        warnings box (level="warning")."""
        self.events.warn(text)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, s = self.cfg, self.state
        s.started_at = time.time()
        s.name = validate_name(cfg.name, "LoRA name")
        def check_output() -> Path:
            # Fail before any work when the final file (or a card file beside it) would be
            # replaced, or a folder cannot take the LoRA or the run.
            path = lora_output_file(cfg.output_dir, s.name, overwrite=cfg.overwrite)
            writable_folder(path.parent, "the LoRA")
            writable_folder(run_folder(cfg, s.name), "the run")
            return path

        # The main process writes them (on its machine): its refusal stops every process.
        s.lora_path = distributed.broadcast(s.procs, distributed.main_only(s.procs, check_output))
        self.load_all()
        self.open_logs()
        self.begin_reliability()

    def load_all(self, optimizer: bool = True) -> None:
        """Run folder, data, model, latents and LoRA; then (optimizer=True) the learning rate
        (reusing a stopped run's, else probing when 'auto') and the optimizer. Benchmarks and
        tests that drive steps themselves call this instead of setup()."""
        s = self.state
        self.prepare_run_dir()
        # Each process reads the data and the model itself: a refusal on one (a folder or model
        # another machine lacks) stops all of them with its sentence (distributed.together).
        distributed.together(s.procs, self.load_data)
        distributed.together(s.procs, self.load_model)
        if self.cfg.cache_latents_to_disk:
            with distributed.main_first(s.procs):  # the others read its cache
                self.cache_latents()
        else:
            distributed.together(s.procs, self.cache_latents)
        distributed.together(s.procs, self.build_network)
        if not optimizer:
            return
        s.resume_state = distributed.load_for_resume(s, self.cfg, self.events, state_mod.load_for_resume)
        self.resolve_lr()
        self.build_optimizer()

    def prepare_run_dir(self) -> None:
        cfg, s = self.cfg, self.state
        s.run_dir = run_folder(cfg, validate_name(cfg.name, "LoRA name"))  # also called without setup()
        distributed.main_only(s.procs, self.write_run_dir)

    def write_run_dir(self) -> None:
        """The run folder, its config.json and the event log (the main process's)."""
        cfg, s = self.cfg, self.state
        try:
            (s.run_dir / "logs").mkdir(parents=True, exist_ok=True)
            (s.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            atomic_write_json(s.run_dir / "config.json", distributed.run_config_values(to_dict(cfg), s.procs))
        except OSError as err:
            where = err.filename or s.run_dir / "config.json"  # a failed flush names no file
            raise file_error(err, where, then="then start the training again") from None
        self.events.file = s.run_dir / "logs" / "events.jsonl"

    def load_data(self) -> None:
        cfg, s = self.cfg, self.state
        if not cfg.dataset and not cfg.subsets:
            raise UserError("No dataset folder given; pass the folder of training images.")
        root = cfg.dataset or cfg.subsets[0]["image_dir"]
        self.label("reading the dataset", 0, 0)
        self.phase(f"Reading the dataset {root}")
        s.dataset = data_mod.scan_dataset(root, cfg)
        s.plan = s.dataset.plan
        text = s.plan.describe() + "\n" + lr_plan(cfg)
        family = config_family(cfg, s.backbone)
        if family is not SD15:
            text += "\n" + family_note(cfg, family)
        self.emit("plan", text=text, **s.plan.to_dict())

    def load_model(self) -> None:
        cfg, s = self.cfg, self.state
        s.device = resolve_device(cfg) if s.backbone is None else torch.device(s.backbone.device)
        s.precision = training_precision(cfg.mixed_precision, s.device, getattr(s.backbone, "dtype", None))
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[s.precision]
        if s.backbone is None:
            from lib_lora.training.models_sdxl import load_backbone  # of whichever family the model is

            self.phase(f"Loading the base model {cfg.base_model} on {s.device}")
            s.backbone = load_backbone(cfg.base_model, device=str(s.device), dtype=weight_dtype)
        bb = s.backbone
        s.precision = training_precision(cfg.mixed_precision, s.device, bb.dtype)
        if cfg.mixed_precision == "no" and s.precision != "no":
            self.phase(f"The host's model is {bb.dtype}; training with {s.precision} mixed precision.")
        s.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": None}[s.precision]
        for part in (bb.unet, bb.text_encoder, getattr(bb, "text_encoder_2", None)):  # SDXL: two encoders
            if part is not None:
                part.requires_grad_(False)
                part.eval()
        s.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.gradient_checkpointing:
            speed.enable_gradient_checkpointing(bb, cfg.train_text_encoder)
        s.tokens = data_mod.CaptionTokens(bb.tokenizer, shuffled=self.captions_vary(), family=family_of(bb),
                                          max_tokens=cfg.max_token_length)
        s.schedule = training_schedule(family_of(bb), cfg.zero_terminal_snr, s.device)
        s.sqrt_ac, s.sqrt_1mac, s.snr = s.schedule.sqrt_ac, s.schedule.sqrt_1mac, s.schedule.snr
        if cfg.zero_terminal_snr and not cfg.v_parameterization:  # kohya warns the same
            self.warn("--zero-terminal-snr without --v-parameterization: the last timestep is pure noise, which "
                      "a noise-predicting model cannot learn to denoise; training may go wrong.")

    def cache_latents(self) -> None:
        cfg, s = self.cfg, self.state
        self.phase(f"Caching latents of {len(s.dataset.items)} images")
        cache_dir = s.run_dir / "latent_cache" if cfg.cache_latents_to_disk else None
        skipped = []
        # Hashing the VAE's weights takes a while: once, for the cache and the lookup below.
        s.vae_id = data_mod.vae_identity(s.backbone)
        # (Each latent's VAE sample is seeded from its cache key inside cache_latents.)
        latents = data_mod.cache_latents(s.dataset.items, s.backbone, cache_dir, self.progress,
                                         on_skip=lambda p, r: skipped.append((p, r)), vae_id=s.vae_id)  # fmt: skip
        if skipped:
            listed = len(s.plan.skipped)  # the first plan event listed these already
            for p, r in skipped:
                s.plan.skipped.append({"path": str(p), "reason": r})
            if not s.dataset.items:
                raise UserError("None of the dataset's images could be loaded; fix or replace them.")
            s.plan = data_mod.make_plan(
                s.dataset.root, s.dataset.subsets, s.dataset.items, cfg, s.plan.skipped
            )
            s.dataset.plan = s.plan
            self.emit("plan", text=s.plan.describe(skipped_since=listed), **s.plan.to_dict())
        s.latent_of = {id(it): latents[data_mod.latent_key(it, s.vae_id)] for it in s.dataset.items}
        s.flipped_of = {id(it): latents[data_mod.latent_key(it, s.vae_id, flipped=True)]
                        for it in s.dataset.items if it.settings.flip_aug}
        if cfg.masked_loss:
            self.load_masks()

    def load_masks(self) -> None:
        """The loss masks of masked_loss (training/masks.py), at the latents' sizes."""
        from lib_lora.training.masks import load_masks

        s = self.state
        found = load_masks(s.dataset.items, s.dataset.root, s.latent_of)
        for text in found.problems:
            self.warn(text)
        n = len(s.dataset.items)
        if not found.found:
            self.warn(f"Masked loss is on, but none of the {n} images has a mask (Prepare writes them into masks/ "
                      "when it removes backgrounds with --keep-rgba) or transparency: the loss is not masked.")
        else:
            self.phase(f"Masked loss: {found.found} of {n} images have a mask; the others count whole.")
        s.mask_of = found.of or None
        s.mask_digests = found.digests

    def captions_vary(self) -> bool:
        """Whether captions come out new nearly every draw (shuffled, tags dropped: see
        CaptionSettings.varies), so the token and text-encoder caches are bypassed."""
        return any(it.settings.varies for it in self.state.dataset.items)

    def build_network(self) -> None:
        from lib_lora.training.lycoris_net import make_network

        cfg, s = self.cfg, self.state
        torch.manual_seed(cfg.seed)  # LoRA init and dropout draw from torch's global RNG
        if s.device.type == "cuda":
            torch.cuda.manual_seed_all(cfg.seed)
        targets = s.backbone.lora_targets(conv=cfg.conv_dim > 0)
        unet_prefix = family_of(s.backbone).unet_prefix
        keep = []
        for t in targets:
            is_unet = _target_name(t).startswith(unet_prefix + "_")
            if (is_unet and cfg.train_unet) or (not is_unet and cfg.train_text_encoder):
                keep.append(t)
        s.network = make_network(keep, cfg)  # plain LoRA, or a LyCORIS type (training/lycoris_net.py)
        s.network.to(s.device, torch.float32)  # LoRA weights stay fp32 under mixed precision
        s.network.apply()
        s.network.train()
        s.unet_params = s.network.unet_parameters(unet_prefix) if cfg.train_unet else []
        s.te_params = s.network.te_parameters(unet_prefix) if cfg.train_text_encoder else []
        n = sum(p.numel() for p in s.unet_params + s.te_params)
        self.phase(f"LoRA: {len(keep)} modules, {n / 1e6:.2f} M trainable parameters (dim {cfg.dim}, alpha {cfg.alpha})")

    def probe_lr(self) -> tuple[float, float | None]:
        """(U-Net lr, text-encoder lr or None) for lr = 'auto': the LR probe (training/probe.py)."""
        return distributed.probe_once(
            self.state, lambda: probe.auto_lr(self.state, self.cfg, self.events, self.build_optimizer, self.train_step))

    def resolve_lr(self) -> None:
        cfg, s = self.cfg, self.state
        lr, te = cfg.unet_lr_value, None
        if lr is None:
            from lib_lora.training.state import saved_lrs

            saved = saved_lrs(s.resume_state)
            if saved is not None:  # a resumed run keeps the value its probe found
                lr, te = saved
                self.phase(f"Learning rate from the stopped run: {lr:.3g} (no new probe).")
            else:
                lr, te = self.probe_lr()
        s.unet_lr = lr
        s.te_lr = text_encoder_lr(cfg, lr) if te is None or cfg.text_encoder_lr is not None else te

    def build_optimizer(self, cfg: TrainConfig | None = None, unet_lr: float | None = None,
                        te_lr: float | None = None) -> None:
        """The optimizer, LR schedule, grad scaler and noise generator, into the run state; from
        the run's config and learning rates, or (the LR probe) those given."""
        s = self.state
        cfg = self.cfg if cfg is None else cfg
        unet_lr = s.unet_lr if unet_lr is None else unet_lr
        te_lr = s.te_lr if te_lr is None else te_lr
        groups = param_groups(s.unet_params, s.te_params, unet_lr, te_lr)
        s.optim = make_optimizer(cfg, groups, s.device)
        if s.optim.note:
            self.warn(s.optim.note)
        self.emit("optimizer", requested=cfg.optimizer, used=s.optim.used, note=s.optim.note)
        s.optimizer = s.optim.optimizer
        s.total_steps = s.plan.total_steps
        s.scheduler = make_scheduler(cfg, s.optimizer, s.total_steps)
        s.params = s.unet_params + s.te_params
        s.scaler = torch.amp.GradScaler("cuda") if s.precision == "fp16" and s.device.type == "cuda" else None
        s.noise_gen = torch.Generator("cpu").manual_seed(cfg.seed)

    def begin_reliability(self) -> None:
        """Issue 5: non-finite/OOM guard around each step; resume from the saved state."""
        s = self.state
        s.guard = guards.new_counters(s.optimizer, s.device)
        state_mod.begin(s, self.cfg, self.events)

    def open_logs(self) -> None:
        s = self.state
        if not distributed.writes(s):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            s.tb = SummaryWriter(log_dir=str(s.run_dir / "logs"))
        except Exception as err:  # noqa: BLE001 - TensorBoard is a convenience, never a blocker
            s.tb = None
            self.warn(f"TensorBoard logging is off ({type(err).__name__}: {err}).")

    # ---------------------------------------------------------------- one step
    def train_step(self, batch: data_mod.Batch) -> torch.Tensor:
        """One optimisation step; returns the batch's loss as a detached device tensor (no sync)."""
        # Out-of-memory is handled around this call by guards.run_step (issue 5: oom_retry
        # turns gradient checkpointing on, then splits the batch: train_in_halves).
        if distributed.parallel(self.state):  # this process's share of the batch, DDP averaging
            return distributed.train_share(self.state, batch, self.step_inputs, self.backward, self.optimizer_step)
        return self.compute_step(self.step_inputs(batch))

    def train_in_halves(self, batch: data_mod.Batch) -> torch.Tensor:
        """One optimisation step of `batch` in two halves, their gradients accumulated: the same
        update as the whole batch (each half's loss weighted by its share), at half the memory."""
        n, half = len(batch.items), (len(batch.items) + 1) // 2
        parts = [batch.part(0, half), batch.part(half, n)]
        loss = sum(self.backward(self.step_inputs(p), len(p.items) / n) * (len(p.items) / n) for p in parts)
        self.optimizer_step()
        return loss

    def guarded_step(self, batch: data_mod.Batch) -> torch.Tensor:
        """The loop's step: `train_step` inside the non-finite and out-of-memory guard."""
        return guards.run_step(self.state, self.cfg, batch, self.train_step, self.train_in_halves, self.phase)

    # -- speed hooks (issue 8): inputs prepared once and resident on the device; see speed.py
    def step_inputs(self, batch: data_mod.Batch) -> speed.StepData:
        s = self.state
        if s.feeder is None:
            cfg = self.cfg
            # Shuffled or tag-dropped captions bypass the text-encoder cache (kohya refuses the
            # combination); a dropped caption is one more fixed one, so caption dropout keeps it.
            varies = self.captions_vary()
            cache_te = cfg.cache_text_encoder_outputs and not s.te_params and not varies
            fmt, s.restore_memory_format = speed.apply_memory_format(s.backbone.unet, cfg.channels_last)
            encode = speed.text_chunk_encoder(s.backbone, cfg.clip_skip, s.device, s.amp_dtype)
            timesteps = family_of(s.backbone).schedule.num_train_timesteps
            s.feeder = speed.StepFeeder(
                s.latent_of, s.tokens, s.device, s.noise_gen, timesteps,
                cfg.noise_offset, encode if cache_te else None, fmt, fixed_captions=not varies,
                time_ids=sample_time_ids if "time_ids" in family_of(s.backbone).extra_conditioning else None,
                noise=noise_mod.recipe_of(cfg, timesteps), mask_of=s.mask_of,
                flipped_of=s.flipped_of, prior_loss_weight=cfg.prior_loss_weight,
            )  # fmt: skip
            s.predict = speed.compile_predict(s.backbone.predict_noise, cfg.compile_unet)
        s.feeder.gen = s.noise_gen  # build_optimizer (re)seeds it, e.g. after the LR probe
        return s.feeder(batch)

    def compute_step(self, d: speed.StepData) -> torch.Tensor:
        """The step's compute from prepared inputs (the synthetic-data benchmark calls this too)."""
        loss = self.backward(d)
        self.optimizer_step()
        return loss

    def backward(self, d: speed.StepData, weight: float = 1.0) -> torch.Tensor:
        """Forward and backward of one batch, its gradients (times `weight`) added to the LoRA's.
        A batch split by the out-of-memory retry passes each part's share of the batch as weight,
        so the parts add up to the whole batch's gradient. Returns the batch's loss, detached."""
        s = self.state
        cfg, bb = self.cfg, s.backbone
        latents, noise, t = d.latents, d.noise, d.timesteps
        b = latents.shape[0]
        shape = (b, 1, 1, 1)
        noisy = s.sqrt_ac[t].view(shape) * latents + s.sqrt_1mac[t].view(shape) * noise

        amp = s.amp_dtype is not None
        with torch.autocast(s.device.type, dtype=s.amp_dtype or torch.float32, enabled=amp):
            cond, pooled = d.cond, d.pooled
            if cond is None:
                with torch.set_grad_enabled(bool(s.te_params)):
                    cond, pooled = speed.split_conditioning(bb.encode_text(d.ids, clip_skip=cfg.clip_skip))
            pred = predict_with(s.predict, bb, noisy, t, cond, pooled, d.time_ids)
        loss = loss_mod.per_sample_loss(pred, latents, noise, t, self.loss_spec(), s.schedule, d.mask)
        if d.loss_weights is not None:  # regularisation images: prior_loss_weight (kohya's)
            loss = loss * d.loss_weights
        loss = loss.mean()
        scaled = loss * weight if weight != 1.0 else loss
        if s.scaler is not None:
            s.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        """Clip, step the optimizer and the LR schedule, clear the gradients."""
        cfg, s = self.cfg, self.state
        if s.scaler is not None:
            s.scaler.unscale_(s.optimizer)
        # The clip's total norm doubles as the non-finite guard's check (guards.step_optimizer).
        s.grad_norm = torch.nn.utils.clip_grad_norm_(s.params, cfg.max_grad_norm) if cfg.max_grad_norm else None
        s.grad_norm = distributed.agreed_norm(s, s.grad_norm, s.params)  # every process skips the same steps
        # (scaler.step + update, or optimizer.step; a non-finite update skipped once the guard is on)
        guards.step_optimizer(s.guard, s.optimizer, s.scaler, s.grad_norm, s.params)
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)

    def loss_spec(self) -> loss_mod.LossSpec:
        return loss_mod.loss_spec(self.cfg, family_of(self.state.backbone).schedule.num_train_timesteps)

    @torch.no_grad()
    def fixed_loss(self, timesteps: tuple[int, ...] = (50, 200, 400, 600, 800, 950), seed: int = 1234) -> float:
        """Mean loss over fixed (noise, timestep) pairs of every training image, with the LoRA as
        it is now: a learning signal that does not depend on the step's random draw. The loss is
        the training step's (loss.per_sample_loss: target, loss type, mask, min-SNR weights)."""
        s = self.state
        gen = torch.Generator("cpu").manual_seed(seed)
        total, n = 0.0, 0
        was_training = s.network.training
        s.network.eval()  # no dropout while measuring
        try:
            extra = "time_ids" in family_of(s.backbone).extra_conditioning
            for it in s.dataset.items:
                lat = s.latent_of[id(it)].unsqueeze(0).to(s.device)
                ids = s.tokens.batch([data_mod.process_caption(it.caption, it.settings, 0, None)]).to(s.device)
                tids = sample_time_ids([it]).to(s.device) if extra else None
                for ts in timesteps:
                    noise = torch.randn(lat.shape, generator=gen).to(s.device)
                    t = torch.tensor([ts], device=s.device)
                    noisy = s.sqrt_ac[t].view(1, 1, 1, 1) * lat + s.sqrt_1mac[t].view(1, 1, 1, 1) * noise
                    with torch.autocast(s.device.type, dtype=s.amp_dtype or torch.float32, enabled=s.amp_dtype is not None):
                        cond, pooled = speed.split_conditioning(s.backbone.encode_text(ids, clip_skip=self.cfg.clip_skip))
                        pred = predict_with(s.backbone.predict_noise, s.backbone, noisy, t, cond, pooled, tids)
                    mask = s.mask_of[id(it)].unsqueeze(0).to(s.device) if s.mask_of else None
                    total += loss_mod.per_sample_loss(pred, lat, noise, t, self.loss_spec(), s.schedule, mask).item()
                    n += 1
        finally:
            s.network.train(was_training)
        return total / n

    # ---------------------------------------------------------------- saving
    def trained_config(self) -> TrainConfig:
        """The config as the run trains it: the out-of-memory retry may have turned gradient
        checkpointing on (the LoRA's metadata and the step-time record say so)."""
        if self.state.gradient_checkpointing and not self.cfg.gradient_checkpointing:
            return dataclasses.replace(self.cfg, gradient_checkpointing=True)
        return self.cfg

    def metadata(self, finished: bool = False) -> dict[str, str]:
        s = self.state
        run = RunInfo(
            started_at=s.started_at,
            unet_lr=s.unet_lr,
            text_encoder_lr=s.te_lr,
            optimizer=s.optim.used,
            optimizer_args=s.optim.args,
            mixed_precision=s.precision,
            model_name=getattr(s.backbone, "model_name", "") or self.cfg.base_model,
            model_hash=getattr(s.backbone, "model_hash", "") or "",
            session_id=s.session_id,
            steps=s.step,
            epoch=s.step // max(1, s.plan.steps_per_epoch),
            finished_at=time.time() if finished else None,
            warmup_steps=warmup_steps(self.cfg, s.total_steps),
            tag_frequency=data_mod.tag_frequency(s.dataset),
            bucket_info=data_mod.bucket_info(s.dataset.items, self.cfg),
            model_legacy_hash=getattr(s.backbone, "model_legacy_hash", "") or "",
            extra={**s.extra_metadata, **distributed.metadata(s.procs, self.cfg)},
        )
        return build_metadata(self.trained_config(), s.plan, run, family_of(s.backbone))

    def save_lora(self, path: Path, overwrite: bool, finished: bool = False) -> Path:
        from lib_lora.training.export import write_lora

        s = self.state
        if not distributed.writes(s):
            return Path(path)
        tensors = s.network.state_dict_kohya()
        dtype = SAVE_DTYPES[self.cfg.save_precision]
        try:
            out = write_lora(Path(path), tensors, self.metadata(finished), overwrite=overwrite, dtype=dtype)
        except Exception as err:  # a full disk or a read-only folder, said plainly
            if not is_file_error(err):
                raise
            raise guards.write_error(err, Path(path)) from None
        self.emit("saved", path=str(out), step=s.step)
        return out

    def save_checkpoint(self, tag: str) -> Path:
        """An intermediate LoRA in the run folder (never in the output folder the WebUI scans)."""
        s = self.state
        return self.save_lora(s.run_dir / "checkpoints" / f"{s.name}-{tag}.safetensors", overwrite=True)

    # ---------------------------------------------------------------- the run
    def label(self, text: str, done: int | None = None, total: int | None = None) -> None:
        """Say which phase runs now (the progress text), keeping the counter where it is."""
        s = self.state
        if self.progress is not None:
            total = s.total_steps if total is None else total
            self.progress.update(s.step if done is None else done, total, text)

    def log_losses(self, window: list[torch.Tensor], epoch_sum: torch.Tensor, epoch_n: int,
                   tensorboard: bool = True) -> None:
        s = self.state
        cur, avg, ep = torch.stack([window[-1], torch.stack(window).mean(), epoch_sum / epoch_n]).tolist()
        s.final_loss = avg
        lrs = group_lrs(s.optimizer)
        if s.tb is not None and tensorboard:
            s.tb.add_scalar("loss/current", cur, s.step)
            s.tb.add_scalar("loss/average", ep, s.step)
            if "unet" in lrs:
                s.tb.add_scalar("lr/unet", lrs["unet"], s.step)
            if "textencoder" in lrs:
                s.tb.add_scalar("lr/textencoder", lrs["textencoder"], s.step)
            dlr = lrs.get("unet_d*lr", lrs.get("textencoder_d*lr"))
            if dlr is not None:
                s.tb.add_scalar("lr/d*lr", dlr, s.step)
        self.emit("loss", step=s.step, loss=cur, average=ep, lr=lrs)
        if self.progress is not None:
            self.progress.update(s.step, s.total_steps, TRAINING)

    def run(self) -> TrainResult:
        s = self.state
        s.session_id = uuid.uuid4().hex
        t0 = time.time()
        written = self.written_export()
        # The main process decides for all: it removes the state once done, so another process
        # reading it then would start training and wait for a main process that has gone.
        sent = None if written is None else (int(written["step"]), float(written["final_loss"]))
        finished = distributed.broadcast(s.procs, sent)
        if finished is not None:
            result = distributed.main_only(s.procs, lambda: self.complete_export(written, t0))
            if distributed.writes(s):
                return result
            return TrainResult(Path(self.cfg.output_dir) / f"{s.name}.safetensors", s.run_dir, *finished)
        try:
            self.setup()
            self.train_loop()
            done = distributed.main_only(s.procs, self.export)  # the others end once the LoRA is written
            path, metadata = done if distributed.writes(s) else (s.lora_path, {})
        except (Cancelled, KeyboardInterrupt):
            # Several processes: a stop may land inside a collective, mid-step; the last periodic
            # state is the exact one (training/distributed.py), so nothing more is written.
            if s.network is not None and s.step > 0 and not s.procs.many:
                self.save_checkpoint(f"interrupted-step{s.step:06d}")
                state_mod.on_stop(s, self.cfg, self.events)
            raise
        finally:
            self.close()
            self.release()
        seconds = time.time() - t0
        self.emit("done", lora_path=str(path), steps=s.step, final_loss=s.final_loss, seconds=seconds,
                  seconds_per_step=s.seconds_per_step)
        return TrainResult(path, s.run_dir, s.step, s.final_loss, metadata)

    def export(self) -> tuple[Path, dict[str, str]]:
        """The final LoRA and its card files; then the run's state is removed."""
        s = self.state
        self.save_step_time()
        self.label("writing the LoRA")
        self.phase(f"Writing {s.lora_path}")
        path = self.save_lora(s.lora_path, overwrite=self.cfg.overwrite, finished=True)
        from lib_lora.training.export import read_metadata

        metadata = read_metadata(path)  # as written: the result's and the card's
        self.write_card_files(path, metadata, overwrite=self.cfg.overwrite)
        # Last: until here the state says "export not finished" to a re-run (written_export).
        state_mod.finish(s.run_dir)
        return path, metadata

    def save_step_time(self) -> None:
        """The measured seconds per step, for the next plan's time estimate (training/timing.py)."""
        from lib_lora.training import timing

        s = self.state
        sps = s.seconds_per_step
        if sps:
            try:
                timing.save(s.run_dir, timing.record(self.trained_config(), str(s.device), sps))
            except OSError as err:  # an estimate is a convenience: the run goes on
                log.warning("The step time could not be saved in %s (%s).", s.run_dir, err)

    def train_loop(self) -> None:
        cfg, s = self.cfg, self.state
        total, spe = s.total_steps, s.plan.steps_per_epoch
        self.phase(f"Training {total} steps on {s.device} ({s.precision if s.precision != 'no' else 'fp32'})")
        self.label(TRAINING)
        from lib_lora.training import timing

        every = chart_every(total, cfg.log_every_n_steps)
        clock = timing.StepClock(s.step)

        sample_at = sample_mod.sample_steps(total, cfg.sample_images, cfg.sample_every_n_steps,
                                            cfg.sample_every_n_epochs, spe)  # fmt: skip
        window: list[torch.Tensor] = []
        epoch_sum, epoch_n = torch.zeros((), device=s.device), 0
        for batch in data_mod.iter_batches(s.dataset.items, cfg, total, cfg.seed, start_step=s.step):
            check_cancel(self.progress)
            loss = self.guarded_step(batch)
            s.step += 1
            window.append(loss)
            epoch_sum, epoch_n = epoch_sum + loss, epoch_n + 1
            if s.step % every == 0 or s.step == total:
                guards.settle(s, cfg)  # the skip counters are read with the loss, not every step
                self.log_losses(window, epoch_sum, epoch_n,
                                tensorboard=s.step % cfg.log_every_n_steps == 0 or s.step == total)
                clock.mark(s.step)  # the loss is read back: the device has finished these steps
                window = []
                if s.step == total:
                    guards.check_final_loss(s.step, s.final_loss)  # before the last state is saved
            elif self.progress is not None:
                self.progress.update(s.step, total, TRAINING)
            if s.step % spe == 0:
                epoch_sum, epoch_n = torch.zeros((), device=s.device), 0
                epoch = s.step // spe
                if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and s.step < total:
                    clock.pause()
                    self.label("saving a checkpoint")
                    distributed.main_only(s.procs, lambda tag=f"epoch{epoch:04d}": self.save_checkpoint(tag))
                    self.label(TRAINING)
                    clock.resume()
            if cfg.save_every_n_steps and s.step % cfg.save_every_n_steps == 0 and s.step < total:
                clock.pause()
                self.label("saving a checkpoint")
                distributed.main_only(s.procs, lambda: self.save_checkpoint(f"step{s.step:06d}"))
                self.label(TRAINING)
                clock.resume()
            if s.step in sample_at:
                clock.pause()
                distributed.main_only(s.procs, self.samples_in_loop)
                clock.resume()
                self.label(TRAINING)
            if state_mod.state_due(s, cfg):  # the main process writes; a failed write stops every process
                distributed.main_only(s.procs, lambda: state_mod.after_step(s, cfg, self.events))
        s.seconds_per_step = clock.seconds_per_step()
        if s.tokens.truncated:
            self.warn(f"{len(s.tokens.truncated)} caption(s) were longer than {s.tokens.max_tokens} tokens and were cut.")

    def samples_in_loop(self) -> None:
        try:
            self.make_samples()
        except torch.OutOfMemoryError:  # samples are a view of the run, never a reason to lose it
            guards.release_memory(self.state.optimizer)
            self.warn(f"No sample images at step {self.state.step}: the GPU ran out of memory; training goes on.")

    def make_samples(self) -> None:
        """Sample images of the LoRA as it is now, into <run dir>/samples; a `sample` event each."""
        s = self.state
        cfg, bb = self.cfg, s.backbone
        if not distributed.writes(s):
            return
        if getattr(bb, "decode_latents", None) is None:
            self.warn("No sample images: this model has no VAE decoder.")
            return
        trigger = self.trigger_word()
        prompts = sample_mod.prompts_from(cfg.sample_prompts, trigger)
        self.label("making samples")
        self.phase(f"Making {len(prompts)} sample image(s) at step {s.step}")
        t0 = time.time()
        made = sample_mod.make_samples(
            bb, s.tokens, prompts, s.run_dir / "samples", f"{s.name}-step{s.step:06d}",
            size=(cfg.resolution, cfg.resolution), steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg_scale,
            negative=cfg.sample_negative_prompt, seed=cfg.seed, clip_skip=cfg.clip_skip, amp_dtype=s.amp_dtype,
            network=s.network, progress=self.progress,
            family=for_run(family_of(bb), cfg.v_parameterization, cfg.zero_terminal_snr),
        )  # fmt: skip
        s.last_samples = [path for path, _ in made]
        for path, prompt in made:
            self.emit("sample", path=str(path), step=s.step, prompt=prompt, seconds=round(time.time() - t0, 2))

    def write_card_files(self, lora_path: Path, metadata: dict[str, str], overwrite: bool = True,
                         last_sample: Path | None = None, card: bool = True) -> None:
        """The card's `.json` and, when samples were made, the last one as `.preview.png`, beside
        the LoRA (the WebUI shows both on its card). The LoRA is saved already: a failure here
        is reported, never fatal. overwrite=False leaves a card file that is there already (one
        the user made while the run trained is theirs)."""
        from lib_lora.training.card import preview_path, write_card, write_preview

        last = self.state.last_samples
        last_sample = last_sample or (last[0] if last else None)

        def preview() -> None:
            from PIL import Image

            with Image.open(last_sample) as im:
                write_preview(lora_path, im.convert("RGB"), overwrite=overwrite)

        jobs = [(lora_path.with_suffix(".json"), lambda: write_card(lora_path, metadata, overwrite=overwrite))] if card else []
        if last_sample is not None:
            jobs.append((preview_path(lora_path), preview))
        for target, write in jobs:
            try:
                write()
            except OSError as err:
                why = "a file of that name is there already, kept" if isinstance(err, FileExistsError) else str(err)
                self.warn(f"The LoRA is saved, but {target.name} could not be written ({why}).")

    def written_export(self) -> dict | None:
        """The saved state when this run already wrote its final LoRA but was stopped before the
        export finished (training/state.written_export); None otherwise."""
        s = self.state
        s.name = validate_name(self.cfg.name, "LoRA name")
        s.run_dir = run_folder(self.cfg, s.name)
        path = Path(self.cfg.output_dir) / f"{s.name}.safetensors"
        if not distributed.writes(s) or path.resolve().parent != Path(self.cfg.output_dir).resolve():
            return None  # the main process decides (run); lora_output_file refuses such a path in setup()
        return state_mod.written_export(s.run_dir, self.cfg, path)

    def complete_export(self, st: dict, t0: float) -> TrainResult:
        """Finish an export a killed run left half done: the card files it lacks, then the state's
        clean-up. No model is loaded: the LoRA and its metadata are in the file."""
        from lib_lora.atomic import cleanup_stale_temps
        from lib_lora.training.card import preview_path
        from lib_lora.training.export import read_metadata

        s = self.state
        s.lora_path = path = Path(self.cfg.output_dir) / f"{s.name}.safetensors"
        removed = [p for folder in (s.run_dir, path.parent) for p in cleanup_stale_temps(folder, recursive=True)]
        missing = [p.name for p in (path.with_suffix(".json"), preview_path(path)) if not p.exists()]
        metadata = read_metadata(path)
        samples = sorted((s.run_dir / "samples").glob(f"{glob.escape(s.name)}-step*-00.png"))
        sample = samples[-1] if samples and not preview_path(path).exists() else None
        self.write_card_files(path, metadata, overwrite=False, last_sample=sample,
                              card=not path.with_suffix(".json").exists())
        state_mod.finish(s.run_dir)
        s.step, s.final_loss = int(st["step"]), float(st["final_loss"])
        done = [n for n in missing if (path.parent / n).exists()]
        self.phase(
            f"{path} was already written by this run, which stopped before it finished; "
            + (f"wrote {' and '.join(done)} and " if done else "")
            + "finished the export" + (f" (removed {len(removed)} temporary file(s))." if removed else ".")
        )
        self.emit("done", lora_path=str(path), steps=s.step, final_loss=s.final_loss, seconds=time.time() - t0)
        return TrainResult(path, s.run_dir, s.step, s.final_loss, metadata)

    def trigger_word(self) -> str:
        """The captions' most common first tag (what keep_tokens holds in place), else the name."""
        from collections import Counter

        s = self.state
        firsts = Counter(it.caption.split(",")[0].strip() for it in s.dataset.items if it.caption.strip())
        return firsts.most_common(1)[0][0] if firsts else s.name

    def close(self) -> None:
        s = self.state
        if s.tb is not None:
            s.tb.close()
            s.tb = None
        if s.network is not None:
            s.network.remove()  # the host's model is left exactly as it was
        if s.restore_memory_format is not None:
            s.restore_memory_format()
            s.restore_memory_format = None

    def release(self) -> None:
        """Let go of the run's memory (latent cache, optimizer state, LoRA network, step feeder,
        caption cache, the model a CLI run loaded), then hand freed memory back to the system: a
        host process runs job after job, and anything still referencing a finished Trainer (an
        error's traceback, a UI's job record) must not pin it. The result fields stay."""
        release_run_only(self.state)
        guards.return_freed_memory()


def train(
    cfg: TrainConfig,
    backbone: Backbone | None = None,
    progress: Progress | None = None,
    on_event: Callable[[dict], None] | None = None,
    procs: distributed.Processes | None = None,
) -> TrainResult:
    """Train a LoRA as `cfg` says; the final file goes to cfg.output_dir/<name>.safetensors.
    `procs`: this process of a data-parallel run (training/distributed.py; cfg its global_config)."""
    return Trainer(cfg, backbone, progress, on_event, procs).run()
