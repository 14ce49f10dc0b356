"""Guards around one training step: non-finite numbers and CUDA out-of-memory.

Non-finite loss or gradients never reach the LoRA's weights. With an optimizer that takes a
device-side skip flag (torch's fused AdamW, `_step_supports_amp_scaling`) the check stays on
the device: the flag is `not isfinite(total grad norm)` (or the fp16 grad scaler's own
`found_inf`), the fused kernel leaves weights and moments alone when it is set, and the
skip counters are device tensors read only when the loop reads the loss anyway
(`settle()`, every `log_every_n_steps`) — no host sync in the step (issue 8). Other
optimizers (Prodigy, D-Adaptation, bitsandbytes) get a host check of the gradients before
they step, or the fp16 grad scaler's skip. After `cfg.max_nonfinite_steps` skipped steps in a
row the run stops with advice (on the device path at the next loss read), and the last saved
state and checkpoint are kept: skipped steps never change the weights they hold.

Out-of-memory on the GPU gives a message with the numbers (batch, resolution, free memory);
with `cfg.oom_retry` (on by default) the step is retried once with gradient checkpointing, then
with the batch split in halves whose gradients add up to one optimizer step. Memory is released
either way.

These are functions over the run's state (`run_state.RunState`, its `GuardCounters`): the loop
calls `step_optimizer` where it steps the optimizer, `run_step` around each train step and
`settle` where it reads the loss. Nothing here imports the loop.
"""

from __future__ import annotations

import ctypes
import gc
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lib_lora.errors import UserError
from lib_lora.training.run_state import GuardCounters, RunState

if TYPE_CHECKING:
    from lib_lora.config import TrainConfig
    from lib_lora.training.data import Batch


class NonFiniteError(UserError):
    """Too many steps in a row with NaN/inf loss or gradients."""


class OutOfMemory(UserError):
    """The GPU ran out of memory and no retry was allowed or left."""


def total_grad_norm(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The 2-norm over all gradients as a device tensor (no host read); None without gradients.
    Non-finite when any gradient is."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return None
    total = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6 (foreach kernels)
    if total is not None:
        return total(grads, 2.0)
    # Older torch in a WebUI: one reduction per tensor, still on the device.
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def takes_device_skip_flag(optimizer: torch.optim.Optimizer) -> bool:
    """torch's fused optimizers read `found_inf` (a device tensor) and skip the update on the device."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def new_counters(optimizer: torch.optim.Optimizer, device: torch.device) -> GuardCounters:
    """The guard's counts for a run that steps `optimizer` on `device`."""
    return GuardCounters(on_device=takes_device_skip_flag(optimizer),
                         counts=torch.tensor([0.0, 0.0, 0.0, -1.0], device=device))  # fmt: skip


# ------------------------------------------------------------ the optimizer step
def step_optimizer(
    g: GuardCounters | None,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    grad_norm: torch.Tensor | None,
    params: list[torch.Tensor],
) -> None:
    """Step `optimizer` (through the fp16 grad `scaler` when there is one), skipping an update
    whose gradients are non-finite and noting it in `g`; `grad_norm` is the clip's total norm
    (None: computed here when needed). Unguarded (`g` None, the LR probe): a plain step."""
    if scaler is not None:
        # The scaler steps only when its unscale found the gradients finite, except a fused
        # optimizer, which it steps every time with its found_inf (the kernel skips on the device).
        scaler.step(optimizer)
        if g is not None:
            found = scaler._found_inf_per_device(optimizer)  # read before update() clears it
            if g.on_device:
                bad = sum(t.to(g.counts.device, non_blocking=True) for t in found.values())
                g.flags.append((bad > 0).float().reshape(()))
                g.stepped = True
            elif not sum(v.item() for v in found.values()):  # the scaler's own host check
                g.stepped = True
        scaler.update()
        return
    if g is None:
        optimizer.step()
        return
    norm = grad_norm if grad_norm is not None else total_grad_norm(params)
    if g.on_device:
        bad = torch.zeros((), device=g.counts.device) if norm is None else (~torch.isfinite(norm)).float()
        g.flags.append(bad.reshape(()))
        g.stepped = True
        # The protocol torch's GradScaler uses with fused optimizers: they read these two
        # attributes during step() and leave weights and moments alone when found_inf is set.
        optimizer.found_inf, optimizer.grad_scale = bad, None  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]
        return
    if norm is not None and not bool(torch.isfinite(norm)):  # one host read
        return
    g.stepped = True
    optimizer.step()


# ------------------------------------------------------------ one step
def run_step(
    rs: RunState,
    cfg: TrainConfig,
    batch: Batch,
    train_whole: Callable[[Batch], torch.Tensor],
    train_halves: Callable[[Batch], torch.Tensor],
    phase: Callable[[str], None],
) -> torch.Tensor:
    """One train step of `batch` with the non-finite count and the out-of-memory handling:
    `train_whole(batch)` (the loop's step), or after an out-of-memory retry turned the split
    on, `train_halves(batch)` (two halves, one optimizer step). `phase` reports a retry."""
    try:
        loss = _train(rs.guard, batch, train_whole, train_halves)
    except torch.OutOfMemoryError as err:
        loss = _handle_oom(rs, cfg, batch, err, train_whole, train_halves, phase)
    _count(rs, cfg, loss)
    return loss


def _train(g: GuardCounters, batch: Batch, train_whole: Callable[[Batch], torch.Tensor],
           train_halves: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
    g.stepped = False
    g.flags = []
    if not g.split_batches or len(batch.items) < 2:
        return train_whole(batch)
    return train_halves(batch)


def _count(rs: RunState, cfg: TrainConfig, loss: torch.Tensor) -> None:
    g = rs.guard
    if g.on_device:
        _count_on_device(g, loss, rs.step)
        return
    if g.stepped:
        g.in_a_row = 0
        return
    g.in_a_row += 1
    g.skipped_total += 1
    if g.first_bad_step is None:
        g.first_bad_step = rs.step + 1
    limit = cfg.max_nonfinite_steps
    if limit and g.in_a_row >= limit:
        _stop(rs, loss, g.in_a_row, rs.step + 1)


def _count_on_device(g: GuardCounters, loss: torch.Tensor, step: int) -> None:
    """The same counting as `_count`, as device arithmetic (a handful of tiny kernels, no sync)."""
    c = g.counts
    # Skipped = every optimizer step of this train step was skipped (or none ran).
    bad = torch.stack(g.flags).prod() if g.flags else torch.ones((), device=c.device)
    run = (c[0] + bad) * bad
    first = torch.where((c[3] < 0) & (bad > 0), torch.full_like(c[3], step + 1), c[3])
    g.counts = torch.stack([run, c[1] + bad, torch.maximum(c[2], run), first])
    g.last_loss = loss


def settle(rs: RunState, cfg: TrainConfig) -> None:
    """Read the device counters (one host read; the loop calls this where it reads the loss)
    and stop the run if the limit of skipped steps in a row was reached since the last read."""
    g = rs.guard
    if not g.on_device:
        return
    run, total, longest, first = (int(v) for v in g.counts.tolist())
    g.in_a_row, g.skipped_total = run, total
    g.first_bad_step = first if first >= 0 else None
    g.counts[2] = g.counts[0]
    limit = cfg.max_nonfinite_steps
    if limit and longest >= limit:
        # Called after the loop counted the step, so rs.step is the step just done.
        _stop(rs, g.last_loss if g.last_loss is not None else torch.tensor(float("nan")), longest, rs.step)


def _stop(rs: RunState, loss: torch.Tensor, in_a_row: int, at_step: int) -> None:
    value = float(loss)
    what = f"the loss was {value}" if not math.isfinite(value) else "the gradients were NaN/inf"
    fp16 = rs.precision == "fp16"
    advice = (
        "set --mixed-precision to bf16 or no (fp32), lower the learning rate, or lower alpha"
        if fp16 else "lower the learning rate, lower alpha, or turn max_grad_norm on"
    )  # fmt: skip
    raise NonFiniteError(
        f"Training stopped at step {at_step}: {in_a_row} steps in a row were skipped because "
        f"{what}. {advice[0].upper() + advice[1:]}. The last good state and checkpoints in "
        f"{rs.run_dir} were kept."
    )


def check_final_loss(step: int, loss: float) -> None:
    """A run whose last logged loss is NaN/inf has diverged, even if too few steps in a row
    were skipped to stop it: its weights are not a LoRA anyone should load."""
    if math.isfinite(loss):
        return
    raise NonFiniteError(
        f"Training ended at step {step} with a non-finite loss ({loss}), so no LoRA was saved and the state "
        f"of that step was not kept; lower the learning rate or alpha (or turn max_grad_norm on) and start the "
        "run over."
    )


# ------------------------------------------------------------ out of memory
def _describe(rs: RunState, cfg: TrainConfig, batch: Batch) -> str:
    w, h = batch.items[0].bucket if batch.items else (cfg.resolution, cfg.resolution)
    return f"batch {len(batch.items)} at {w}x{h}, {memory_text(rs.device)}"


def _handle_oom(rs: RunState, cfg: TrainConfig, batch: Batch, err: BaseException,
                train_whole: Callable[[Batch], torch.Tensor], train_halves: Callable[[Batch], torch.Tensor],
                phase: Callable[[str], None]) -> torch.Tensor:  # fmt: skip
    g = rs.guard
    first = _describe(rs, cfg, batch)
    release_memory(rs.optimizer)
    if not cfg.oom_retry:
        raise OutOfMemory(
            f"The GPU ran out of memory at step {rs.step + 1} ({first}). Lower the batch size or resolution, "
            "turn on gradient checkpointing, or allow automatic retries with --oom-retry."
        ) from err
    while True:
        if not rs.gradient_checkpointing and "checkpointing" not in g.oom_retries:
            g.oom_retries.append("checkpointing")
            enable_gradient_checkpointing(rs)
            phase(f"Out of GPU memory ({first}); retrying with gradient checkpointing.")
        elif not g.split_batches and len(batch.items) >= 2:
            g.oom_retries.append("split")
            g.split_batches = True
            phase(f"Out of GPU memory ({first}); retrying with the batch split in halves.")
        else:
            raise OutOfMemory(
                f"The GPU ran out of memory at step {rs.step + 1} ({first}) even after retrying with "
                f"{' and '.join(g.oom_retries) or 'nothing left to try'}. Lower the resolution or batch size, "
                "or close other programs using the GPU."
            ) from err
        try:
            return _train(g, batch, train_whole, train_halves)
        except torch.OutOfMemoryError as again:
            err = again
            first = _describe(rs, cfg, batch)
            release_memory(rs.optimizer)


def memory_text(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        return f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"
    return "free memory unknown (not a CUDA device)"


def release_memory(optimizer: torch.optim.Optimizer | None) -> None:
    """Drop the failed step's gradients and cached blocks so the retry (or the host) gets them back."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def return_freed_memory() -> None:
    """After a job: collect its objects, give cached GPU blocks back, and ask glibc to return
    freed heap pages to the system (a job's worker thread leaves its malloc arena full of free
    pages: ~90 MB per job measured with bench/job_rss.py). Elsewhere the trim is skipped."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
            pass


def enable_gradient_checkpointing(rs: RunState) -> None:
    """The out-of-memory retry's first remedy; the run's metadata and step-time record say it
    trained with checkpointing from here on (rs.gradient_checkpointing)."""
    from lib_lora.training.speed import enable_gradient_checkpointing as enable

    enable(rs.backbone, bool(rs.te_params))
    rs.gradient_checkpointing = True


def write_error(err: BaseException, path: Path) -> UserError:
    """A user's sentence for a failed write of a LoRA (the atomic write left any previous file intact)."""
    from lib_lora.errors import file_error

    return file_error(err, path, then="then start the same training again: any previous file there is intact "
                      "and the run resumes from its saved state")
