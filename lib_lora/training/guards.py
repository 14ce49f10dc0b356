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
"""

from __future__ import annotations

import ctypes
import gc
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lib_lora.errors import UserError

if TYPE_CHECKING:
    from lib_lora.training.data import Batch
    from lib_lora.training.run import Trainer


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


def step_grad_norm(trainer: Trainer) -> torch.Tensor | None:
    """This step's total gradient norm: the clip's (`compute_step` keeps it), else computed."""
    norm = getattr(trainer, "grad_norm", None)
    return norm if norm is not None else total_grad_norm(trainer.params)


def takes_device_skip_flag(optimizer: torch.optim.Optimizer) -> bool:
    """torch's fused optimizers read `found_inf` (a device tensor) and skip the update on the device."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class StepGuard:
    """Wraps the trainer's optimizer.step to skip non-finite updates and count them."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.in_a_row = 0
        self.skipped_total = 0
        self.first_bad_step: int | None = None
        self._stepped = False
        self.oom_retries: list[str] = []
        self.split_batches = False
        opt = trainer.optimizer
        self._inner_step = opt.step
        self.on_device = takes_device_skip_flag(opt)
        # Device path: 1.0 per optimizer step of this train step that was skipped, and the
        # counters [in a row, total, longest run since the last settle, first bad step or -1].
        self._flags: list[torch.Tensor] = []
        self._counts = torch.tensor([0.0, 0.0, 0.0, -1.0], device=trainer.device)

        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            if self.on_device:
                if trainer.scaler is None:
                    norm = step_grad_norm(trainer)
                    bad = torch.zeros((), device=trainer.device) if norm is None else (~torch.isfinite(norm)).float()
                    opt.found_inf, opt.grad_scale = bad, None
                else:  # the fp16 grad scaler set found_inf (and steps fused optimizers every time)
                    bad = (opt.found_inf > 0).float()
                self._flags.append(bad.reshape(()))
                self._stepped = True
                return self._inner_step(*args, **kwargs)
            # With a grad scaler this is only called when the scaler found the grads finite.
            if trainer.scaler is None:
                norm = step_grad_norm(trainer)
                if norm is not None and not bool(torch.isfinite(norm)):  # one host read
                    return None
            self._stepped = True
            return self._inner_step(*args, **kwargs)

        # Tell the LR scheduler's order check that this is still its wrapped step (no false warning).
        guarded_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        opt.step = guarded_step  # an instance attribute: the optimizer class is untouched

    # ------------------------------------------------------------ one step
    def run_step(self, batch: Batch) -> torch.Tensor:
        """trainer.train_step(batch) with the non-finite count and the out-of-memory handling."""
        try:
            loss = self._train(batch)
        except torch.OutOfMemoryError as err:
            loss = self._handle_oom(batch, err)
        self._count(loss)
        return loss

    def _train(self, batch: Batch) -> torch.Tensor:
        tr = self.trainer
        self._stepped = False
        self._flags = []
        if not self.split_batches or len(batch.items) < 2:
            return tr.train_step(batch)
        from lib_lora.training.data import Batch as B

        # Halves of the batch, their gradients accumulated into one optimizer step: the same
        # update as the whole batch (each half's loss weighted by its share), at half the memory.
        n, half = len(batch.items), (len(batch.items) + 1) // 2
        parts = [B(batch.epoch, batch.items[:half], batch.captions[:half]),
                 B(batch.epoch, batch.items[half:], batch.captions[half:])]  # fmt: skip
        loss = sum(tr.backward(tr.step_inputs(p), len(p.items) / n) * (len(p.items) / n) for p in parts)
        tr.optimizer_step()
        return loss

    def _count(self, loss: torch.Tensor) -> None:
        tr = self.trainer
        if self.on_device:
            self._count_on_device(loss)
            return
        if self._stepped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped_total += 1
        if self.first_bad_step is None:
            self.first_bad_step = tr.step + 1
        limit = getattr(tr.cfg, "max_nonfinite_steps", 0)
        if limit and self.in_a_row >= limit:
            self._stop(loss, self.in_a_row, tr.step + 1)

    def _count_on_device(self, loss: torch.Tensor) -> None:
        """The same counting as `_count`, as device arithmetic (a handful of tiny kernels, no sync)."""
        c = self._counts
        # Skipped = every optimizer step of this train step was skipped (or none ran).
        bad = torch.stack(self._flags).prod() if self._flags else torch.ones((), device=c.device)
        run = (c[0] + bad) * bad
        first = torch.where((c[3] < 0) & (bad > 0), torch.full_like(c[3], self.trainer.step + 1), c[3])
        self._counts = torch.stack([run, c[1] + bad, torch.maximum(c[2], run), first])
        self._last_loss = loss

    def settle(self) -> None:
        """Read the device counters (one host read; the loop calls this where it reads the loss)
        and stop the run if the limit of skipped steps in a row was reached since the last read."""
        if not self.on_device:
            return
        run, total, longest, first = (int(v) for v in self._counts.tolist())
        self.in_a_row, self.skipped_total = run, total
        self.first_bad_step = first if first >= 0 else None
        self._counts[2] = self._counts[0]
        limit = getattr(self.trainer.cfg, "max_nonfinite_steps", 0)
        if limit and longest >= limit:
            # Called after the loop counted the step, so trainer.step is the step just done.
            self._stop(getattr(self, "_last_loss", torch.tensor(float("nan"))), longest, self.trainer.step)

    def _stop(self, loss: torch.Tensor, in_a_row: int, at_step: int) -> None:
        value = float(loss)
        what = f"the loss was {value}" if not math.isfinite(value) else "the gradients were NaN/inf"
        fp16 = self.trainer.precision == "fp16"
        advice = (
            "set --mixed-precision to bf16 or no (fp32), lower the learning rate, or lower alpha"
            if fp16 else "lower the learning rate, lower alpha, or turn max_grad_norm on"
        )  # fmt: skip
        raise NonFiniteError(
            f"Training stopped at step {at_step}: {in_a_row} steps in a row were skipped because "
            f"{what}. {advice[0].upper() + advice[1:]}. The last good state and checkpoints in "
            f"{self.trainer.run_dir} were kept."
        )

    def check_final_loss(self, loss: float) -> None:
        """A run whose last logged loss is NaN/inf has diverged, even if too few steps in a row
        were skipped to stop it: its weights are not a LoRA anyone should load."""
        if math.isfinite(loss):
            return
        tr = self.trainer
        raise NonFiniteError(
            f"Training ended at step {tr.step} with a non-finite loss ({loss}), so no LoRA was saved and the state "
            f"of that step was not kept; lower the learning rate or alpha (or turn max_grad_norm on) and start the "
            "run over."
        )

    # ------------------------------------------------------------ out of memory
    def _describe(self, batch: Batch) -> str:
        tr = self.trainer
        w, h = batch.items[0].bucket if batch.items else (tr.cfg.resolution, tr.cfg.resolution)
        return f"batch {len(batch.items)} at {w}x{h}, {memory_text(tr.device)}"

    def _handle_oom(self, batch: Batch, err: BaseException) -> torch.Tensor:
        tr = self.trainer
        first = self._describe(batch)
        release_memory(tr)
        if not getattr(tr.cfg, "oom_retry", False):
            raise OutOfMemory(
                f"The GPU ran out of memory at step {tr.step + 1} ({first}). Lower the batch size or resolution, "
                "turn on gradient checkpointing, or allow automatic retries with --oom-retry."
            ) from err
        while True:
            if not tr.cfg.gradient_checkpointing and "checkpointing" not in self.oom_retries:
                self.oom_retries.append("checkpointing")
                enable_gradient_checkpointing(tr)
                tr.phase(f"Out of GPU memory ({first}); retrying with gradient checkpointing.")
            elif not self.split_batches and len(batch.items) >= 2:
                self.oom_retries.append("split")
                self.split_batches = True
                tr.phase(f"Out of GPU memory ({first}); retrying with the batch split in halves.")
            else:
                raise OutOfMemory(
                    f"The GPU ran out of memory at step {tr.step + 1} ({first}) even after retrying with "
                    f"{' and '.join(self.oom_retries) or 'nothing left to try'}. Lower the resolution or batch size, "
                    "or close other programs using the GPU."
                ) from err
            try:
                return self._train(batch)
            except torch.OutOfMemoryError as again:
                err = again
                first = self._describe(batch)
                release_memory(tr)


def memory_text(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        return f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"
    return "free memory unknown (not a CUDA device)"


def release_memory(trainer: Trainer) -> None:
    """Drop the failed step's gradients and cached blocks so the retry (or the host) gets them back."""
    opt = getattr(trainer, "optimizer", None)
    if opt is not None:
        opt.zero_grad(set_to_none=True)
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


def enable_gradient_checkpointing(trainer: Trainer) -> None:
    import dataclasses

    from lib_lora.training.speed import enable_gradient_checkpointing as enable

    enable(trainer.backbone, bool(trainer.te_params))
    trainer.cfg = dataclasses.replace(trainer.cfg, gradient_checkpointing=True)


def write_error(err: BaseException, path: Path) -> UserError:
    """A user's sentence for a failed write of a LoRA (the atomic write left any previous file intact)."""
    from lib_lora.errors import file_error

    return file_error(err, path, then="then start the same training again: any previous file there is intact "
                      "and the run resumes from its saved state")
