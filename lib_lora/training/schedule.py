"""The noise schedule, read from the model family: training, the sample images and the
standalone Test tab's samplers must all use the schedule the model was trained with."""

from __future__ import annotations

from typing import Any

import torch

from lib_lora.training.family import SD15, ModelFamily


def noise_schedule(family: ModelFamily = SD15) -> torch.Tensor:
    """alphas_cumprod of the family's DDPM schedule, fp32."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**family.schedule.betas(), clip_sample=False).alphas_cumprod.to(torch.float32)


def family_scheduler(cls: Any, family: ModelFamily = SD15, **extra: Any) -> Any:
    """A diffusers scheduler class set up with the family's schedule (and its `steps_offset`,
    as the models' scheduler configs have)."""
    s = family.schedule
    return cls(**s.betas(), prediction_type=s.prediction_type, steps_offset=s.steps_offset, **extra)


def ddim(steps: int, family: ModelFamily = SD15) -> Any:  # -> diffusers.DDIMScheduler
    """The family's DDIM settings, with `steps` inference steps set."""
    from diffusers import DDIMScheduler

    sched = family_scheduler(DDIMScheduler, family, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    return sched
