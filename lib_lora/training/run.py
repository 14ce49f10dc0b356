"""The training loop: `train(cfg)` runs one LoRA training from a config to a LoRA file.

The `Trainer` keeps the phases apart so later work can slot in: `setup()` (run folder, data,
model, latents, network, optimizer, logs), `resolve_lr()` (the LR probe hooks in here),
`train_step()` (one optimisation step, no host sync), `save_lora()` / `save_checkpoint()`,
and `run()` which strings them together. Events go to `on_event` as dicts:
'phase' {text}, 'plan' {StepPlan fields, text}, 'loss' {step, loss, average, lr},
'saved' {path, step}, 'done' {lora_path, steps, final_loss, seconds, seconds_per_step}.
The progress text is the current phase's label only ("caching latents", "LR probe",
"training", "making samples", ...): numbers such as the loss travel in the events.
"""

from __future__ import annotations

import glob
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lib_lora.atomic import atomic_write_json, writable_folder
from lib_lora.config import TrainConfig, to_dict, validate
from lib_lora.errors import Cancelled, UserError, file_error, is_file_error
from lib_lora.names import lora_output_file, validate_name
from lib_lora.progress import Progress, check_cancel
from lib_lora.training import data as data_mod
from lib_lora.training import sample as sample_mod
from lib_lora.training import speed
from lib_lora.training.backbone import Backbone
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
from lib_lora.training.schedule import NUM_TRAIN_TIMESTEPS, noise_schedule

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


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    """'fp16' | 'bf16' | 'no' (fp32)."""
    mp = cfg.mixed_precision
    if mp == "auto":
        return "fp16" if device.type == "cuda" else "no"
    if mp == "fp16" and device.type != "cuda":
        raise UserError("fp16 mixed precision needs a CUDA GPU; set --mixed-precision to no (or bf16) on the CPU.")
    return mp


def run_folder(cfg: TrainConfig, name: str) -> Path:
    """Where a run keeps its config, logs, checkpoints and resumable state."""
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / name


def _target_name(t: Any) -> str:
    return t.name if hasattr(t, "name") else t[0]


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        backbone: Backbone | None = None,
        progress: Progress | None = None,
        on_event: Callable[[dict], None] | None = None,
    ) -> None:
        self.cfg = validate(cfg)
        self.backbone = backbone
        self.progress = progress
        self.on_event = on_event
        self.step = 0
        self.final_loss = float("nan")
        self._events_file: Path | None = None
        self.resume_state: dict | None = None  # a stopped run's saved state (training/state.py)
        self.extra_metadata: dict[str, str] = {}  # later phases add keys (the LR probe: fastlora_lr_probe)

    # ---------------------------------------------------------------- events
    def emit(self, kind: str, **fields: Any) -> None:
        event = {"kind": kind, **fields}
        if kind == "phase":
            log.debug(fields.get("text", ""))
        if self._events_file is not None:
            with open(self._events_file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(event, ensure_ascii=False, default=str) + "\n")
        if self.on_event is not None:
            self.on_event(event)

    def phase(self, text: str) -> None:
        self.emit("phase", text=text)

    def warn(self, text: str) -> None:
        """A phase line that is a warning: printed like any phase by the CLI, shown in the UI's
        warnings box (level="warning")."""
        self.emit("phase", text=text, level="warning")

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.started_at = time.time()
        self.name = validate_name(cfg.name, "LoRA name")
        # Fail before any work when the final file (or a card file beside it) would be replaced.
        self.lora_path = lora_output_file(cfg.output_dir, self.name, overwrite=cfg.overwrite)
        # A folder that cannot take the LoRA is found now, not after the whole run.
        writable_folder(self.lora_path.parent, "the LoRA")
        writable_folder(run_folder(cfg, self.name), "the run")
        self.load_all()
        self.open_logs()
        self.begin_reliability()

    def load_all(self, optimizer: bool = True) -> None:
        """Run folder, data, model, latents and LoRA; then (optimizer=True) the learning rate
        (reusing a stopped run's, else probing when 'auto') and the optimizer. Benchmarks and
        tests that drive steps themselves call this instead of setup()."""
        self.prepare_run_dir()
        self.load_data()
        self.load_model()
        self.cache_latents()
        self.build_network()
        if not optimizer:
            return
        from lib_lora.training import state as state_mod

        self.resume_state = state_mod.load_for_resume(self)
        self.resolve_lr()
        self.build_optimizer()

    def prepare_run_dir(self) -> None:
        cfg = self.cfg
        self.run_dir = run_folder(cfg, validate_name(cfg.name, "LoRA name"))  # also called without setup()
        try:
            (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run_dir / "config.json", to_dict(cfg))
        except OSError as err:
            where = err.filename or self.run_dir / "config.json"  # a failed flush names no file
            raise file_error(err, where, then="then start the training again") from None
        self._events_file = self.run_dir / "logs" / "events.jsonl"

    def load_data(self) -> None:
        cfg = self.cfg
        if not cfg.dataset:
            raise UserError("No dataset folder given; pass the folder of training images.")
        self.label("reading the dataset", 0, 0)
        self.phase(f"Reading the dataset {cfg.dataset}")
        self.dataset = data_mod.scan_dataset(cfg.dataset, cfg)
        self.plan = self.dataset.plan
        self.emit("plan", text=self.plan.describe() + "\n" + lr_plan(cfg), **self.plan.to_dict())

    def load_model(self) -> None:
        cfg = self.cfg
        self.device = resolve_device(cfg) if self.backbone is None else torch.device(self.backbone.device)
        self.precision = resolve_precision(cfg, self.device)
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[self.precision]
        if self.backbone is None:
            from lib_lora.training.models import load_backbone

            self.phase(f"Loading the base model {cfg.base_model} on {self.device}")
            self.backbone = load_backbone(cfg.base_model, device=str(self.device), dtype=weight_dtype)
        bb = self.backbone
        if cfg.mixed_precision == "auto" and bb.dtype == torch.bfloat16:
            self.precision = "bf16"  # a host running bf16 weights trains under bf16 autocast, no scaler
        if self.precision == "no" and bb.dtype in (torch.float16, torch.bfloat16):
            # A host's half-precision model (the WebUI's) can only be trained under autocast.
            self.precision = "fp16" if bb.dtype == torch.float16 else "bf16"
            self.phase(f"The host's model is {bb.dtype}; training with {self.precision} mixed precision.")
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": None}[self.precision]
        bb.unet.requires_grad_(False)
        bb.text_encoder.requires_grad_(False)
        bb.unet.eval()
        bb.text_encoder.eval()
        if cfg.gradient_checkpointing:
            speed.enable_gradient_checkpointing(bb, cfg.train_text_encoder)
        self.tokens = data_mod.CaptionTokens(bb.tokenizer, shuffled=cfg.shuffle_caption, max_tokens=cfg.max_token_length)
        ac = noise_schedule().to(self.device)
        self.sqrt_ac = ac.sqrt()
        self.sqrt_1mac = (1 - ac).sqrt()
        self.snr = ac / (1 - ac)

    def cache_latents(self) -> None:
        cfg = self.cfg
        self.phase(f"Caching latents of {len(self.dataset.items)} images")
        cache_dir = self.run_dir / "latent_cache" if cfg.cache_latents_to_disk else None
        skipped = []
        # Hashing the VAE's weights takes a while: once, for the cache and the lookup below.
        self.vae_id = data_mod.vae_identity(self.backbone)
        # (Each latent's VAE sample is seeded from its cache key inside cache_latents.)
        latents = data_mod.cache_latents(self.dataset.items, self.backbone, cache_dir, self.progress,
                                         on_skip=lambda p, r: skipped.append((p, r)), vae_id=self.vae_id)  # fmt: skip
        if skipped:
            listed = len(self.plan.skipped)  # the first plan event listed these already
            for p, r in skipped:
                self.plan.skipped.append({"path": str(p), "reason": r})
            if not self.dataset.items:
                raise UserError("None of the dataset's images could be loaded; fix or replace them.")
            self.plan = data_mod.make_plan(
                self.dataset.root, self.dataset.subsets, self.dataset.items, cfg, self.plan.skipped
            )
            self.dataset.plan = self.plan
            self.emit("plan", text=self.plan.describe(skipped_since=listed), **self.plan.to_dict())
        self.latent_of = {id(it): latents[data_mod.latent_key(it, self.vae_id)] for it in self.dataset.items}

    def build_network(self) -> None:
        from lib_lora.training.lycoris_net import make_network

        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # LoRA init and dropout draw from torch's global RNG
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(cfg.seed)
        targets = self.backbone.lora_targets(conv=cfg.conv_dim > 0)
        keep = []
        for t in targets:
            name = _target_name(t)
            if (name.startswith("lora_unet") and cfg.train_unet) or (name.startswith("lora_te") and cfg.train_text_encoder):
                keep.append(t)
        self.network = make_network(keep, cfg)  # plain LoRA, or a LyCORIS type (training/lycoris_net.py)
        self.network.to(self.device, torch.float32)  # LoRA weights stay fp32 under mixed precision
        self.network.apply()
        self.network.train()
        self.unet_params = list(self.network.parameters_for("lora_unet")) if cfg.train_unet else []
        self.te_params = list(self.network.parameters_for("lora_te")) if cfg.train_text_encoder else []
        n = sum(p.numel() for p in self.unet_params + self.te_params)
        self.phase(f"LoRA: {len(keep)} modules, {n / 1e6:.2f} M trainable parameters (dim {cfg.dim}, alpha {cfg.alpha})")

    def probe_lr(self) -> tuple[float, float | None]:
        """(U-Net lr, text-encoder lr or None) for lr = 'auto': the LR probe (training/probe.py)."""
        from lib_lora.training.probe import auto_lr

        return auto_lr(self)

    def resolve_lr(self) -> None:
        cfg = self.cfg
        lr, te = cfg.unet_lr_value, None
        if lr is None:
            from lib_lora.training.state import saved_lrs

            saved = saved_lrs(self.resume_state)
            if saved is not None:  # a resumed run keeps the value its probe found
                lr, te = saved
                self.phase(f"Learning rate from the stopped run: {lr:.3g} (no new probe).")
            else:
                lr, te = self.probe_lr()
        self.unet_lr = lr
        self.te_lr = text_encoder_lr(cfg, lr) if te is None or cfg.text_encoder_lr is not None else te

    def build_optimizer(self) -> None:
        cfg = self.cfg
        groups = param_groups(self.unet_params, self.te_params, self.unet_lr, self.te_lr)
        self.optim = make_optimizer(cfg, groups, self.device)
        if self.optim.note:
            self.warn(self.optim.note)
        self.emit("optimizer", requested=cfg.optimizer, used=self.optim.used, note=self.optim.note)
        self.optimizer = self.optim.optimizer
        self.total_steps = self.plan.total_steps
        self.scheduler = make_scheduler(cfg, self.optimizer, self.total_steps)
        self.params = self.unet_params + self.te_params
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" and self.device.type == "cuda" else None
        self.noise_gen = torch.Generator("cpu").manual_seed(cfg.seed)

    def begin_reliability(self) -> None:
        """Issue 5: non-finite/OOM guard around each step; resume from the saved state."""
        from lib_lora.training import guards, state

        self.guard = guards.StepGuard(self)
        state.begin(self)

    def open_logs(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.run_dir / "logs"))
        except Exception as err:  # noqa: BLE001 - TensorBoard is a convenience, never a blocker
            self.tb = None
            self.warn(f"TensorBoard logging is off ({type(err).__name__}: {err}).")

    # ---------------------------------------------------------------- one step
    def train_step(self, batch: data_mod.Batch) -> torch.Tensor:
        """One optimisation step; returns the batch's loss as a detached device tensor (no sync)."""
        # Out-of-memory is handled around this call by guards.StepGuard (issue 5: oom_retry
        # turns gradient checkpointing on, then splits the batch).
        return self.compute_step(self.step_inputs(batch))

    # -- speed hooks (issue 8): inputs prepared once and resident on the device; see speed.py
    def step_inputs(self, batch: data_mod.Batch) -> speed.StepData:
        if getattr(self, "feeder", None) is None:
            cfg = self.cfg
            cache_te = cfg.cache_text_encoder_outputs and not self.te_params and not cfg.shuffle_caption
            fmt, self.restore_memory_format = speed.apply_memory_format(self.backbone.unet, cfg.channels_last)
            encode = speed.text_chunk_encoder(self.backbone, cfg.clip_skip, self.device, self.amp_dtype)
            self.feeder = speed.StepFeeder(
                self.latent_of, self.tokens, self.device, self.noise_gen, NUM_TRAIN_TIMESTEPS,
                cfg.noise_offset, encode if cache_te else None, fmt, fixed_captions=not cfg.shuffle_caption,
            )  # fmt: skip
            self.predict = speed.compile_predict(self.backbone.predict_noise, cfg.compile_unet)
        self.feeder.gen = self.noise_gen  # build_optimizer (re)seeds it, e.g. after the LR probe
        return self.feeder(batch)

    def compute_step(self, d: speed.StepData) -> torch.Tensor:
        """The step's compute from prepared inputs (the synthetic-data benchmark calls this too)."""
        loss = self.backward(d)
        self.optimizer_step()
        return loss

    def backward(self, d: speed.StepData, weight: float = 1.0) -> torch.Tensor:
        """Forward and backward of one batch, its gradients (times `weight`) added to the LoRA's.
        A batch split by the out-of-memory retry passes each part's share of the batch as weight,
        so the parts add up to the whole batch's gradient. Returns the batch's loss, detached."""
        cfg, bb = self.cfg, self.backbone
        latents, noise, t = d.latents, d.noise, d.timesteps
        b = latents.shape[0]
        shape = (b, 1, 1, 1)
        noisy = self.sqrt_ac[t].view(shape) * latents + self.sqrt_1mac[t].view(shape) * noise

        amp = self.amp_dtype is not None
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=amp):
            cond = d.cond
            if cond is None:
                with torch.set_grad_enabled(bool(self.te_params)):
                    cond = bb.encode_text(d.ids, clip_skip=cfg.clip_skip)
            pred = self.predict(noisy.to(bb.dtype), t, cond.to(bb.dtype))
        loss = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma:
            snr = self.snr[t]
            loss = loss * (torch.clamp(snr, max=cfg.min_snr_gamma) / snr)
        loss = loss.mean()
        scaled = loss * weight if weight != 1.0 else loss
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        """Clip, step the optimizer and the LR schedule, clear the gradients."""
        cfg = self.cfg
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # The clip's total norm doubles as the non-finite guard's check (guards.StepGuard).
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm) if cfg.max_grad_norm else None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def fixed_loss(self, timesteps: tuple[int, ...] = (50, 200, 400, 600, 800, 950), seed: int = 1234) -> float:
        """Mean loss over fixed (noise, timestep) pairs of every training image, with the LoRA as
        it is now: a learning signal that does not depend on the step's random draw."""
        gen = torch.Generator("cpu").manual_seed(seed)
        total, n = 0.0, 0
        was_training = self.network.training
        self.network.eval()  # no dropout while measuring
        try:
            for it in self.dataset.items:
                lat = self.latent_of[id(it)].unsqueeze(0).to(self.device)
                ids = self.tokens.batch([it.caption]).to(self.device)
                for ts in timesteps:
                    noise = torch.randn(lat.shape, generator=gen).to(self.device)
                    t = torch.tensor([ts], device=self.device)
                    noisy = self.sqrt_ac[t].view(1, 1, 1, 1) * lat + self.sqrt_1mac[t].view(1, 1, 1, 1) * noise
                    with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                        cond = self.backbone.encode_text(ids, clip_skip=self.cfg.clip_skip)
                        pred = self.backbone.predict_noise(noisy.to(self.backbone.dtype), t, cond.to(self.backbone.dtype))
                    total += F.mse_loss(pred.float(), noise).item()
                    n += 1
        finally:
            self.network.train(was_training)
        return total / n

    # ---------------------------------------------------------------- saving
    def metadata(self, finished: bool = False) -> dict[str, str]:
        run = RunInfo(
            started_at=self.started_at,
            unet_lr=self.unet_lr,
            text_encoder_lr=self.te_lr,
            optimizer=self.optim.used,
            optimizer_args=self.optim.args,
            mixed_precision=self.precision,
            model_name=getattr(self.backbone, "model_name", "") or self.cfg.base_model,
            model_hash=getattr(self.backbone, "model_hash", "") or "",
            session_id=getattr(self, "session_id", ""),
            steps=self.step,
            epoch=self.step // max(1, self.plan.steps_per_epoch),
            finished_at=time.time() if finished else None,
            warmup_steps=warmup_steps(self.cfg, self.total_steps),
            tag_frequency=data_mod.tag_frequency(self.dataset),
            bucket_info=data_mod.bucket_info(self.dataset.items, self.cfg),
            model_legacy_hash=getattr(self.backbone, "model_legacy_hash", "") or "",
            extra=dict(self.extra_metadata),
        )
        return build_metadata(self.cfg, self.plan, run)

    def save_lora(self, path: Path, overwrite: bool, finished: bool = False) -> Path:
        from lib_lora.training.export import write_lora

        tensors = self.network.state_dict_kohya()
        dtype = SAVE_DTYPES[self.cfg.save_precision]
        try:
            out = write_lora(Path(path), tensors, self.metadata(finished), overwrite=overwrite, dtype=dtype)
        except Exception as err:  # a full disk or a read-only folder, said plainly
            if not is_file_error(err):
                raise
            from lib_lora.training.guards import write_error

            raise write_error(err, Path(path)) from None
        self.emit("saved", path=str(out), step=self.step)
        return out

    def save_checkpoint(self, tag: str) -> Path:
        """An intermediate LoRA in the run folder (never in the output folder the WebUI scans)."""
        return self.save_lora(self.run_dir / "checkpoints" / f"{self.name}-{tag}.safetensors", overwrite=True)

    # ---------------------------------------------------------------- the run
    def label(self, text: str, done: int | None = None, total: int | None = None) -> None:
        """Say which phase runs now (the progress text), keeping the counter where it is."""
        if self.progress is not None:
            total = getattr(self, "total_steps", 0) if total is None else total
            self.progress.update(self.step if done is None else done, total, text)

    def log_losses(self, window: list[torch.Tensor], epoch_sum: torch.Tensor, epoch_n: int,
                   tensorboard: bool = True) -> None:
        cur, avg, ep = torch.stack([window[-1], torch.stack(window).mean(), epoch_sum / epoch_n]).tolist()
        self.final_loss = avg
        lrs = group_lrs(self.optimizer)
        if self.tb is not None and tensorboard:
            self.tb.add_scalar("loss/current", cur, self.step)
            self.tb.add_scalar("loss/average", ep, self.step)
            if "unet" in lrs:
                self.tb.add_scalar("lr/unet", lrs["unet"], self.step)
            if "textencoder" in lrs:
                self.tb.add_scalar("lr/textencoder", lrs["textencoder"], self.step)
            dlr = lrs.get("unet_d*lr", lrs.get("textencoder_d*lr"))
            if dlr is not None:
                self.tb.add_scalar("lr/d*lr", dlr, self.step)
        self.emit("loss", step=self.step, loss=cur, average=ep, lr=lrs)
        if self.progress is not None:
            self.progress.update(self.step, self.total_steps, TRAINING)

    def run(self) -> TrainResult:
        from lib_lora.training import state
        self.session_id = uuid.uuid4().hex
        t0 = time.time()
        written = self.written_export()
        if written is not None:
            return self.complete_export(written, t0)
        try:
            self.setup()
            self.train_loop()
            self.save_step_time()
            self.label("writing the LoRA")
            self.phase(f"Writing {self.lora_path}")
            path = self.save_lora(self.lora_path, overwrite=self.cfg.overwrite, finished=True)
            from lib_lora.training.export import read_metadata

            metadata = read_metadata(path)  # as written: the result's and the card's
            self.write_card_files(path, metadata, overwrite=self.cfg.overwrite)
            # Last: until here the state says "export not finished" to a re-run (written_export).
            state.finish(self)
        except (Cancelled, KeyboardInterrupt):
            if getattr(self, "network", None) is not None and self.step > 0:
                self.save_checkpoint(f"interrupted-step{self.step:06d}")
                state.on_stop(self)
            raise
        finally:
            self.close()
            self.release()
        seconds = time.time() - t0
        per_step = getattr(self, "seconds_per_step", None)
        self.emit("done", lora_path=str(path), steps=self.step, final_loss=self.final_loss, seconds=seconds,
                  seconds_per_step=per_step)
        return TrainResult(path, self.run_dir, self.step, self.final_loss, metadata)

    def save_step_time(self) -> None:
        """The measured seconds per step, for the next plan's time estimate (training/timing.py)."""
        from lib_lora.training import timing

        sps = getattr(self, "seconds_per_step", None)
        if sps:
            try:
                timing.save(self.run_dir, timing.record(self.cfg, str(self.device), sps))
            except OSError as err:  # an estimate is a convenience: the run goes on
                log.warning("The step time could not be saved in %s (%s).", self.run_dir, err)

    def train_loop(self) -> None:
        cfg = self.cfg
        total, spe = self.total_steps, self.plan.steps_per_epoch
        self.phase(f"Training {total} steps on {self.device} ({self.precision if self.precision != 'no' else 'fp32'})")
        self.label(TRAINING)
        from lib_lora.training import state as state_mod
        from lib_lora.training import timing

        every = chart_every(total, cfg.log_every_n_steps)
        clock = timing.StepClock(self.step)

        sample_at = sample_mod.sample_steps(total, cfg.sample_images, cfg.sample_every_n_steps,
                                            cfg.sample_every_n_epochs, spe)  # fmt: skip
        window: list[torch.Tensor] = []
        epoch_sum, epoch_n = torch.zeros((), device=self.device), 0
        for batch in data_mod.iter_batches(self.dataset.items, cfg, total, cfg.seed, start_step=self.step):
            check_cancel(self.progress)
            loss = self.guard.run_step(batch)
            self.step += 1
            window.append(loss)
            epoch_sum, epoch_n = epoch_sum + loss, epoch_n + 1
            if self.step % every == 0 or self.step == total:
                self.guard.settle()  # the skip counters are read with the loss, not every step
                self.log_losses(window, epoch_sum, epoch_n,
                                tensorboard=self.step % cfg.log_every_n_steps == 0 or self.step == total)
                clock.mark(self.step)  # the loss is read back: the device has finished these steps
                window = []
                if self.step == total:
                    self.guard.check_final_loss(self.final_loss)  # before the last state is saved
            elif self.progress is not None:
                self.progress.update(self.step, total, TRAINING)
            if self.step % spe == 0:
                epoch_sum, epoch_n = torch.zeros((), device=self.device), 0
                epoch = self.step // spe
                if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and self.step < total:
                    clock.pause()
                    self.label("saving a checkpoint")
                    self.save_checkpoint(f"epoch{epoch:04d}")
                    self.label(TRAINING)
                    clock.resume()
            if cfg.save_every_n_steps and self.step % cfg.save_every_n_steps == 0 and self.step < total:
                clock.pause()
                self.label("saving a checkpoint")
                self.save_checkpoint(f"step{self.step:06d}")
                self.label(TRAINING)
                clock.resume()
            if self.step in sample_at:
                clock.pause()
                try:
                    self.make_samples()
                except torch.OutOfMemoryError:  # samples are a view of the run, never a reason to lose it
                    from lib_lora.training.guards import release_memory

                    release_memory(self)
                    self.warn(f"No sample images at step {self.step}: the GPU ran out of memory; training goes on.")
                clock.resume()
                self.label(TRAINING)
            state_mod.after_step(self)
        self.seconds_per_step = clock.seconds_per_step()
        if self.tokens.truncated:
            self.warn(f"{len(self.tokens.truncated)} caption(s) were longer than {self.tokens.max_tokens} tokens and were cut.")

    def make_samples(self) -> None:
        """Sample images of the LoRA as it is now, into <run dir>/samples; a `sample` event each."""
        cfg, bb = self.cfg, self.backbone
        if getattr(bb, "decode_latents", None) is None:
            self.warn("No sample images: this model has no VAE decoder.")
            return
        trigger = self.trigger_word()
        prompts = sample_mod.prompts_from(cfg.sample_prompts, trigger)
        self.label("making samples")
        self.phase(f"Making {len(prompts)} sample image(s) at step {self.step}")
        t0 = time.time()
        made = sample_mod.make_samples(
            bb, self.tokens, prompts, self.run_dir / "samples", f"{self.name}-step{self.step:06d}",
            size=(cfg.resolution, cfg.resolution), steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg_scale,
            negative=cfg.sample_negative_prompt, seed=cfg.seed, clip_skip=cfg.clip_skip, amp_dtype=self.amp_dtype,
            network=getattr(self, "network", None), progress=self.progress,
        )  # fmt: skip
        self.last_samples = [path for path, _ in made]
        for path, prompt in made:
            self.emit("sample", path=str(path), step=self.step, prompt=prompt, seconds=round(time.time() - t0, 2))

    def write_card_files(self, lora_path: Path, metadata: dict[str, str], overwrite: bool = True,
                         last_sample: Path | None = None, card: bool = True) -> None:
        """The card's `.json` and, when samples were made, the last one as `.preview.png`, beside
        the LoRA (the WebUI shows both on its card). The LoRA is saved already: a failure here
        is reported, never fatal. overwrite=False leaves a card file that is there already (one
        the user made while the run trained is theirs)."""
        from lib_lora.training.card import preview_path, write_card, write_preview

        last = getattr(self, "last_samples", None)
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
        from lib_lora.training import state

        self.name = validate_name(self.cfg.name, "LoRA name")
        self.run_dir = run_folder(self.cfg, self.name)
        path = Path(self.cfg.output_dir) / f"{self.name}.safetensors"
        if path.resolve().parent != Path(self.cfg.output_dir).resolve():
            return None  # lora_output_file refuses it in setup()
        return state.written_export(self, path)

    def complete_export(self, st: dict, t0: float) -> TrainResult:
        """Finish an export a killed run left half done: the card files it lacks, then the state's
        clean-up. No model is loaded: the LoRA and its metadata are in the file."""
        from lib_lora.atomic import cleanup_stale_temps
        from lib_lora.training import state
        from lib_lora.training.card import preview_path
        from lib_lora.training.export import read_metadata

        self.lora_path = path = Path(self.cfg.output_dir) / f"{self.name}.safetensors"
        removed = [p for folder in (self.run_dir, path.parent) for p in cleanup_stale_temps(folder, recursive=True)]
        missing = [p.name for p in (path.with_suffix(".json"), preview_path(path)) if not p.exists()]
        metadata = read_metadata(path)
        samples = sorted((self.run_dir / "samples").glob(f"{glob.escape(self.name)}-step*-00.png"))
        sample = samples[-1] if samples and not preview_path(path).exists() else None
        self.write_card_files(path, metadata, overwrite=False, last_sample=sample,
                              card=not path.with_suffix(".json").exists())
        state.finish(self)
        self.step, self.final_loss = int(st["step"]), float(st["final_loss"])
        done = [n for n in missing if (path.parent / n).exists()]
        self.phase(
            f"{path} was already written by this run, which stopped before it finished; "
            + (f"wrote {' and '.join(done)} and " if done else "")
            + "finished the export" + (f" (removed {len(removed)} temporary file(s))." if removed else ".")
        )
        self.emit("done", lora_path=str(path), steps=self.step, final_loss=self.final_loss, seconds=time.time() - t0)
        return TrainResult(path, self.run_dir, self.step, self.final_loss, metadata)

    def trigger_word(self) -> str:
        """The captions' most common first tag (what keep_tokens holds in place), else the name."""
        from collections import Counter

        firsts = Counter(it.caption.split(",")[0].strip() for it in self.dataset.items if it.caption.strip())
        return firsts.most_common(1)[0][0] if firsts else self.name

    def close(self) -> None:
        if getattr(self, "tb", None) is not None:
            self.tb.close()
            self.tb = None
        if getattr(self, "network", None) is not None:
            self.network.remove()  # the host's model is left exactly as it was
        if getattr(self, "restore_memory_format", None) is not None:
            self.restore_memory_format()
            self.restore_memory_format = None


    # What only a running job needs; `release` drops it when the run ends.
    RUN_ONLY = ("latent_of", "feeder", "predict", "optimizer", "optim", "scheduler", "scaler", "params",
                "unet_params", "te_params", "network", "guard", "noise_gen", "tokens", "dataset", "backbone",
                "resume_state", "sqrt_ac", "sqrt_1mac", "snr")

    def release(self) -> None:
        """Let go of the run's memory (latent cache, optimizer state, LoRA network, step feeder,
        caption cache, the model a CLI run loaded), then hand freed memory back to the system: a
        host process runs job after job, and anything still referencing a finished Trainer (an
        error's traceback, a UI's job record) must not pin it. The result fields stay."""
        for name in self.RUN_ONLY:
            if name in vars(self):
                setattr(self, name, None)
        from lib_lora.training.guards import return_freed_memory

        return_freed_memory()


def train(
    cfg: TrainConfig,
    backbone: Backbone | None = None,
    progress: Progress | None = None,
    on_event: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train a LoRA as `cfg` says; the final file goes to cfg.output_dir/<name>.safetensors."""
    return Trainer(cfg, backbone, progress, on_event).run()
