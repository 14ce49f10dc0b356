"""A training run's mutable state as one value, and where its events go.

`RunState` holds everything a run changes while it goes (network, optimizer, schedule, grad
scaler, step, RNG, guard counters, the resumed state, the caches the steps read); every field
is declared here, with the value it has before the phase that sets it. The loop
(`training/run.py`) owns one and passes it, with the config it needs, to the functions that
work on it: the step guard (`guards.py`), the LR probe (`probe.py`), the resumable state
(`state.py`). None of them imports the loop, and none replaces the run's config: a probe
that trains with other settings gets them as an argument.

`RunEvents` is where a run reports: its events file and the caller's `on_event`, the
progress it updates.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lib_lora.training.distributed import Processes

if TYPE_CHECKING:
    from lib_lora.progress import Progress
    from lib_lora.training.backbone import Backbone
    from lib_lora.training.data import CaptionTokens, Dataset, StepPlan
    from lib_lora.training.lora import LoRANetwork
    from lib_lora.training.optim import OptimizerChoice
    from lib_lora.training.schedule import TrainingSchedule
    from lib_lora.training.speed import StepFeeder

log = logging.getLogger("lib_lora.training.run")


@dataclass(slots=True)  # slots: a field not declared here cannot be set
class GuardCounters:
    """The step guard's counts (training/guards.py): skipped non-finite steps and the
    out-of-memory retries taken so far."""

    on_device: bool = False  # the optimizer takes a device-side skip flag (the count stays on the device)
    in_a_row: int = 0
    skipped_total: int = 0
    first_bad_step: int | None = None
    oom_retries: list[str] = field(default_factory=list)
    split_batches: bool = False
    stepped: bool = False  # host path: an optimizer step of this train step ran
    # Device path: 1.0 per optimizer step of this train step that was skipped, and the
    # counters [in a row, total, longest run since the last settle, first bad step or -1].
    flags: list[torch.Tensor] = field(default_factory=list)
    counts: torch.Tensor | None = None
    last_loss: torch.Tensor | None = None


@dataclass(slots=True)  # slots: a field not declared here cannot be set
class RunState:
    """One training run's mutable state (see the module's docstring)."""

    # Where the run writes.
    name: str = ""
    run_dir: Path = field(default_factory=Path)
    lora_path: Path = field(default_factory=Path)
    session_id: str = ""
    started_at: float = 0.0
    # Data: the dataset, its step plan, the latent and caption caches.
    dataset: Dataset | None = None
    plan: StepPlan | None = None
    vae_id: str = ""
    latent_of: dict[int, torch.Tensor] | None = None  # id(item) -> its cached latent
    flipped_of: dict[int, torch.Tensor] | None = None  # id(item) -> its mirror image's latent (flip_aug)
    tokens: CaptionTokens | None = None
    # The model and how it runs.
    backbone: Backbone | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "no"  # 'fp16' | 'bf16' | 'no' (fp32)
    amp_dtype: torch.dtype | None = None
    gradient_checkpointing: bool = False  # on by the config, or turned on by the out-of-memory retry
    sqrt_ac: torch.Tensor | None = None  # the noise schedule's sqrt(alpha_cumprod) per timestep
    sqrt_1mac: torch.Tensor | None = None  # sqrt(1 - alpha_cumprod)
    snr: torch.Tensor | None = None
    schedule: TrainingSchedule | None = None  # all of the above, and the schedule's alphas_cumprod (loss.py)
    mask_of: dict[int, torch.Tensor] | None = None  # id(item) -> its loss mask (masked_loss), None: no masks
    mask_digests: dict[int, str] | None = None  # id(item) -> sha256 of the mask file it was trained with
    restore_memory_format: Callable[[], None] | None = None  # undoes channels_last on the host's U-Net
    # The LoRA and its optimisation.
    network: LoRANetwork | None = None
    unet_params: list[torch.nn.Parameter] | None = None
    te_params: list[torch.nn.Parameter] | None = None
    params: list[torch.nn.Parameter] | None = None
    unet_lr: float = 0.0
    te_lr: float = 0.0
    optim: OptimizerChoice | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    scaler: torch.amp.GradScaler | None = None
    noise_gen: torch.Generator | None = None  # the loop's noise and timesteps draw from it
    total_steps: int = 0
    grad_norm: torch.Tensor | None = None  # the last step's clipped total norm (the guard reads it)
    # The step's inputs, prepared once (training/speed.py), and the guard's counts.
    feeder: StepFeeder | None = None
    predict: Callable[..., torch.Tensor] | None = None
    guard: GuardCounters | None = None
    # Progress and outputs.
    step: int = 0
    final_loss: float = math.nan
    seconds_per_step: float | None = None
    last_samples: list[Path] = field(default_factory=list)
    tb: Any = None  # the TensorBoard writer, None when off
    # Resume and metadata.
    resume_state: dict | None = None  # a stopped run's saved state (training/state.py), until restored
    extra_metadata: dict[str, str] = field(default_factory=dict)  # e.g. the LR probe's fastlora_lr_probe
    probe_result: Any = None  # the LR probe's ProbeResult, when it ran
    # Data-parallel training (training/distributed.py): which process this is, and the DDP
    # wrapper of the U-Net call once the first parallel step built it.
    procs: Processes = field(default_factory=Processes)
    ddp: Any = None


# What only a running job needs; `release_run_only` drops it when the run ends (the result
# fields stay for whoever still holds the state).
RUN_ONLY = ("latent_of", "flipped_of", "feeder", "predict", "optimizer", "optim", "scheduler", "scaler", "params",
            "unet_params", "te_params", "network", "guard", "noise_gen", "tokens", "dataset", "backbone",
            "resume_state", "sqrt_ac", "sqrt_1mac", "snr", "schedule", "mask_of", "mask_digests", "ddp")  # fmt: skip


def release_run_only(rs: RunState) -> None:
    for name in RUN_ONLY:
        setattr(rs, name, None)


class RunEvents:
    """A run's reports: events as dicts to `on_event` and (once the run folder exists) one JSON
    line each in `file`; `progress` is the caller's progress object (or None)."""

    def __init__(self, on_event: Callable[[dict], None] | None = None, progress: Progress | None = None) -> None:
        self.on_event = on_event
        self.progress = progress
        self.file: Path | None = None

    def emit(self, kind: str, **fields: Any) -> None:
        event = {"kind": kind, **fields}
        if kind == "phase":
            log.debug(fields.get("text", ""))
        if self.file is not None:
            with open(self.file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(event, ensure_ascii=False, default=str) + "\n")
        if self.on_event is not None:
            self.on_event(event)

    def phase(self, text: str) -> None:
        self.emit("phase", text=text)

    def warn(self, text: str) -> None:
        """A phase line that is a warning: printed like any phase by the CLI, shown in the UI's
        warnings box (level="warning")."""
        self.emit("phase", text=text, level="warning")
