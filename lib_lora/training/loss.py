"""The training loss, as kohya's sd-scripts computes it (train_network.py `process_batch`,
library/train_util.py `conditional_loss` and `get_huber_threshold_if_needed`,
library/custom_train_functions.py `apply_masked_loss` and `apply_snr_weight`):

1. the target: the noise, or with v_parameterization the velocity
   v = sqrt(alphas_cumprod_t) * noise - sqrt(1 - alphas_cumprod_t) * latents;
2. per element: l2 (squared error), l1, huber 2c(sqrt(d^2 + c^2) - c) or smooth_l1
   2(sqrt(d^2 + c^2) - c), with c per sample from the huber schedule at its timestep;
3. times the mask, downscaled to latent size (masked_loss);
4. the mean per sample (over the masked-out elements too, as kohya);
5. min-SNR-gamma: times min(SNR_t, gamma) / SNR_t, or / (SNR_t + 1) for v-prediction.

The loop's step, its LR probe (which trains through the step) and the fixed-pairs loss all
use `per_sample_loss`, so they measure one loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lib_lora.config import TrainConfig
    from lib_lora.training.schedule import TrainingSchedule

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
HUBER_SCALE = 1.0  # kohya's --huber_scale default; we have no option for it (its metadata says so)


@dataclass(frozen=True)
class LossSpec:
    v_parameterization: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    min_snr_gamma: float | None = None
    num_timesteps: int = 1000


def loss_spec(cfg: TrainConfig, num_timesteps: int = 1000) -> LossSpec:
    return LossSpec(cfg.v_parameterization, cfg.loss_type, cfg.huber_schedule, cfg.huber_c, cfg.min_snr_gamma,
                    num_timesteps)  # fmt: skip


def _per_sample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.view(-1, *([1] * (like.ndim - 1)))


def target_of(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, sched: TrainingSchedule,
              v_parameterization: bool) -> torch.Tensor:
    """What the U-Net is trained to predict: the noise, or the velocity (diffusers' get_velocity)."""
    if not v_parameterization:
        return noise
    return _per_sample(sched.sqrt_ac[t], latents) * noise - _per_sample(sched.sqrt_1mac[t], latents) * latents


def huber_threshold(spec: LossSpec, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor | None:
    """Huber's c per sample (B,) at its timestep; None for a loss that has none.

    constant: c. exponential: exp(-a t) with a = -ln(c) / T, from 1 at t = 0 down to c at T.
    snr: (1 - c) / (1 + sigma_t)^2 + c with sigma_t = sqrt((1 - alphas_cumprod_t) / alphas_cumprod_t),
    near 1 at low noise and c at high noise."""
    if spec.loss_type not in ("huber", "smooth_l1"):
        return None
    c = spec.huber_c
    if spec.huber_schedule == "exponential":
        a = -math.log(c) / spec.num_timesteps
        return torch.exp(-a * t) * HUBER_SCALE
    if spec.huber_schedule == "snr":
        ac = alphas_cumprod[t]
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return (1 - c) / (1 + sigmas) ** 2 + c
    return torch.full(t.shape, c * HUBER_SCALE, device=t.device)


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = _per_sample(huber_c, pred)
    root = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * root if loss_type == "huber" else 2 * root


def snr_weight(snr_t: torch.Tensor, gamma: float, v_parameterization: bool) -> torch.Tensor:
    """min-SNR-gamma's weight: min(SNR, gamma) / SNR; for v-prediction / (SNR + 1)."""
    return torch.clamp(snr_t, max=gamma) / (snr_t + 1 if v_parameterization else snr_t)


def per_sample_loss(pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                    spec: LossSpec, sched: TrainingSchedule, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) fp32 loss of a batch's prediction (see the module's docstring); `mask` (B, 1, h, w)
    in [0, 1] weights each latent pixel (masked_loss), None for none."""
    target = target_of(latents, noise, t, sched, spec.v_parameterization)
    loss = elementwise_loss(pred.float(), target.float(), spec.loss_type,
                            huber_threshold(spec, t, sched.alphas_cumprod))  # fmt: skip
    if mask is not None:
        loss = loss * mask
    loss = loss.mean(dim=tuple(range(1, loss.ndim)))
    if spec.min_snr_gamma:
        loss = loss * snr_weight(sched.snr[t], spec.min_snr_gamma, spec.v_parameterization)
    return loss
