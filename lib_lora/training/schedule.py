"""The noise schedule, read from the model family: training, the sample images and the
standalone Test tab's samplers must all use the schedule the model was trained with.

A run may change two facts of it (kohya's options): `v_parameterization` (the U-Net predicts
the velocity v instead of the noise) and `zero_terminal_snr` (the betas rescaled so that the
last timestep is pure noise); `for_run` gives the family with those applied, for whatever
samples the run's LoRA, and `training_schedule` the tensors the loop noises latents with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lib_lora.training.family import SD15, ModelFamily


def noise_schedule(family: ModelFamily = SD15) -> torch.Tensor:
    """alphas_cumprod of the family's DDPM schedule, fp32."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**family.schedule.betas(), clip_sample=False).alphas_cumprod.to(torch.float32)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod rescaled to zero terminal SNR (Lin et al. 2023, algorithm 1, as kohya's
    fix_noise_scheduler_betas_for_zero_terminal_snr and diffusers' rescale_betas_zero_snr):
    sqrt(alphas_cumprod) shifted so the last timestep is 0 and scaled so the first keeps its
    value; then squared back. Worked on the square roots directly, which is what the betas'
    round trip of the algorithm amounts to (to float rounding)."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return root**2


@dataclasses.dataclass(frozen=True)
class TrainingSchedule:
    """The per-timestep tensors a training step reads (on the training device)."""

    alphas_cumprod: torch.Tensor  # what the latents are noised with (rescaled for zero terminal SNR)
    sqrt_ac: torch.Tensor  # sqrt(alphas_cumprod)
    sqrt_1mac: torch.Tensor  # sqrt(1 - alphas_cumprod)
    # The SNR min-SNR-gamma weights with: of the family's schedule before a zero-terminal-SNR
    # rescale, as kohya computes it (its all_snr is set before the betas are fixed). So the
    # weight stays finite at the last timestep, whose rescaled SNR is 0.
    snr: torch.Tensor


def training_schedule(family: ModelFamily = SD15, zero_terminal_snr: bool = False,
                      device: torch.device | str = "cpu") -> TrainingSchedule:
    ac = noise_schedule(family).to(device)
    snr = ac / (1 - ac)
    if zero_terminal_snr:
        ac = rescale_zero_terminal_snr(ac)
    return TrainingSchedule(ac, ac.sqrt(), (1 - ac).sqrt(), snr)


def for_run(family: ModelFamily, v_parameterization: bool = False, zero_terminal_snr: bool = False) -> ModelFamily:
    """The family as a run trains it: its schedule predicting v and/or rescaled to zero
    terminal SNR. The family itself when neither is on (families compare by identity)."""
    if not (v_parameterization or zero_terminal_snr):
        return family
    schedule = dataclasses.replace(
        family.schedule,
        prediction_type="v_prediction" if v_parameterization else family.schedule.prediction_type,
        zero_terminal_snr=zero_terminal_snr or family.schedule.zero_terminal_snr,
    )
    return family.replace(schedule=schedule)


def family_scheduler(cls: Any, family: ModelFamily = SD15, **extra: Any) -> Any:
    """A diffusers scheduler class set up with the family's schedule (and its `steps_offset`,
    as the models' scheduler configs have). A zero-terminal-SNR schedule samples from the last
    timestep ("trailing" spacing), where its pure noise is, as the paper and diffusers advise."""
    s = family.schedule
    if s.zero_terminal_snr:
        extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", **extra}
    return cls(**s.betas(), prediction_type=s.prediction_type, steps_offset=s.steps_offset, **extra)


def ddim(steps: int, family: ModelFamily = SD15) -> Any:  # -> diffusers.DDIMScheduler
    """The family's DDIM settings, with `steps` inference steps set."""
    from diffusers import DDIMScheduler

    sched = family_scheduler(DDIMScheduler, family, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    return sched
