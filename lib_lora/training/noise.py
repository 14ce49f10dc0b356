"""The noise a training step adds and the timesteps it draws, as kohya's sd-scripts does it
(train_util.get_noise_noisy_latents_and_timesteps): Gaussian noise; the noise offset
(`noise_offset` x N(0,1) per sample and channel), its strength drawn uniformly in
[0, noise_offset] per step with `noise_offset_random_strength`; multires (pyramid) noise; and
timesteps uniform in [min_timestep, max_timestep).

Every draw comes from the loop's seeded CPU generator, in one fixed order (noise, offset
strength, offset, the pyramid's octaves, timesteps), so a run is reproducible and a resumed
run continues the same sequence. (kohya draws the pyramid's scale factors from Python's
`random`; here they come from the same generator as the rest.) With the defaults the draws
are exactly the loop's earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lib_lora.config import TrainConfig


@dataclass(frozen=True)
class NoiseRecipe:
    noise_offset: float = 0.0
    offset_random_strength: bool = False
    multires_iterations: int = 0
    multires_discount: float = 0.3
    min_timestep: int = 0
    max_timestep: int = 1000  # exclusive, as kohya's torch.randint(min, max)


def recipe_of(cfg: TrainConfig, num_timesteps: int = 1000) -> NoiseRecipe:
    """A config's noise recipe; max_timestep is capped at the schedule's length."""
    return NoiseRecipe(cfg.noise_offset, cfg.noise_offset_random_strength, cfg.multires_noise_iterations,
                       cfg.multires_noise_discount, cfg.min_timestep, min(cfg.max_timestep, num_timesteps))  # fmt: skip


def pyramid_noise(noise: torch.Tensor, gen: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multires noise (kohya's pyramid_noise_like, after J. Whitaker's "multi-resolution noise"):
    octave i adds N(0,1) noise drawn at 1/r^i of the size (r uniform in [2, 4) per octave),
    upsampled bilinearly, weighted discount^i; it stops once an octave is 1 pixel high or wide;
    the sum is scaled back to unit standard deviation (over the whole batch)."""
    b, c, h, w = noise.shape
    out = noise
    for i in range(iterations):
        r = float(torch.rand((), generator=gen)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        low = torch.randn((b, c, hn, wn), generator=gen)
        out = out + F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def draw(recipe: NoiseRecipe, shape: torch.Size | tuple[int, ...], gen: torch.Generator,
         pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise of `shape`, timesteps (B,) long) on the CPU, in pinned memory when `pin`."""
    b, c = shape[0], shape[1]
    noise = torch.randn(shape, generator=gen, pin_memory=pin)
    if recipe.noise_offset:
        strength: float | torch.Tensor = recipe.noise_offset
        if recipe.offset_random_strength:
            strength = torch.rand(1, generator=gen) * recipe.noise_offset
        offset = torch.randn((b, c, 1, 1), generator=gen)
        noise += strength * offset  # in place: `noise` is already in pinned memory
    if recipe.multires_iterations:
        noise = pyramid_noise(noise, gen, recipe.multires_iterations, recipe.multires_discount)
        if pin:
            noise = noise.pin_memory()
    lo, hi = recipe.min_timestep, recipe.max_timestep
    if lo < hi:
        t = torch.randint(lo, hi, (b,), generator=gen, pin_memory=pin)
    else:  # kohya: min = max trains that one timestep
        t = torch.full((b,), hi, dtype=torch.long)
    return noise, t
