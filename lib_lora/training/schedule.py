"""SD1.5's noise schedule, in one place: training, the sample images and the standalone Test
tab's samplers must all use the schedule the model was trained with."""

from __future__ import annotations

from typing import Any

import torch

NUM_TRAIN_TIMESTEPS = 1000
# Scaled-linear betas 0.00085 -> 0.012 over 1000 steps: SD1.5's model_index scheduler config.
SD15_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def noise_schedule() -> torch.Tensor:
    """alphas_cumprod of the SD1.5 DDPM schedule, fp32."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD15_SCHEDULE, clip_sample=False).alphas_cumprod.to(torch.float32)


def sd15_scheduler(cls: Any, **extra: Any) -> Any:
    """A diffusers scheduler class set up with SD1.5's schedule (`steps_offset=1`, as its config has)."""
    return cls(**SD15_SCHEDULE, steps_offset=1, **extra)


def sd15_ddim(steps: int) -> Any:  # -> diffusers.DDIMScheduler
    """SD1.5's DDIM settings, with `steps` inference steps set."""
    from diffusers import DDIMScheduler

    sched = sd15_scheduler(DDIMScheduler, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    return sched
