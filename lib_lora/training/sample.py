"""Sample images during training: what the LoRA makes so far, shown as the run goes.

The model is the one being trained, with the LoRA applied as it is at that step (dropout
off). Sampling is DDIM with the model family's scheduler settings and classifier-free guidance,
through the Backbone interface (text encoder, `predict_noise`, `decode_latents`), so it works
on the standalone and the WebUI backbones alike. It draws its noise from its own generator
and leaves every module's train/eval mode as it found it: a run with samples trains exactly
like one without.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lib_lora.atomic import atomic_write_bytes
from lib_lora.progress import Progress, check_cancel
from lib_lora.training.family import SD15, ModelFamily, family_of
from lib_lora.training.schedule import ddim

if TYPE_CHECKING:
    from PIL import Image

    from lib_lora.training.backbone import Backbone
    from lib_lora.training.data import CaptionTokens


def sample_steps(total: int, count: int, every_n_steps: int, every_n_epochs: int, steps_per_epoch: int) -> set[int]:
    """The steps after which samples are made: `count` evenly spaced (the last at the end of the
    run), plus every N steps / epochs when those are set. Empty when all are off."""
    steps: set[int] = set()
    if count > 0 and total > 0:
        steps.update(max(1, round(total * k / count)) for k in range(1, count + 1))
    if every_n_steps > 0:
        steps.update(range(every_n_steps, total + 1, every_n_steps))
    if every_n_epochs > 0 and steps_per_epoch > 0:
        steps.update(s for s in range(steps_per_epoch * every_n_epochs, total + 1, steps_per_epoch * every_n_epochs))
    return steps


def prompts_from(text: str, trigger: str) -> list[str]:
    """Prompts separated by '|' or new lines; `{trigger}` is replaced; none given: the trigger word."""
    parts = [p.strip() for line in text.splitlines() for p in line.split("|")]
    prompts = [p.replace("{trigger}", trigger) for p in parts if p]
    return prompts or [trigger]


@contextlib.contextmanager
def eval_modes(*roots: nn.Module | None) -> Iterator[None]:
    """Every module in eval mode (no dropout), then each back in the mode it was in."""
    saved = [(m, m.training) for r in roots if r is not None for m in r.modules()]
    try:
        for r in roots:
            if r is not None:
                r.eval()
        yield
    finally:
        for m, was in saved:
            m.training = was


@torch.no_grad()
def denoise(
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    cond: torch.Tensor,
    uncond: torch.Tensor,
    latents: torch.Tensor,
    steps: int,
    cfg_scale: float,
    progress: Progress | None = None,
    family: ModelFamily = SD15,
) -> torch.Tensor:
    """DDIM (eta 0) from `latents` (unit noise) with guidance: out = u + s * (c - u), the model's
    output read as the family's schedule says (the noise, or v for v-prediction)."""
    sched = ddim(steps, family)
    x = latents * sched.init_noise_sigma
    both = torch.cat([uncond, cond])
    for t in sched.timesteps:
        check_cancel(progress)
        tt = torch.full((2 * x.shape[0],), int(t), device=x.device, dtype=torch.long)
        eps_u, eps_c = predict(torch.cat([x, x]), tt, both).float().chunk(2)
        eps = eps_u + cfg_scale * (eps_c - eps_u)
        x = sched.step(eps, t, x.float()).prev_sample.to(x.dtype)
    return x


def to_image(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> an RGB image."""
    from PIL import Image

    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def added_predict(backbone: Backbone, pooled: torch.Tensor, size_hw: tuple[int, int]) -> Callable:
    """SDXL's noise prediction for `denoise`: the (uncond, cond) pooled embeddings and the time
    ids of an uncropped image of the sample's size (original = target, crop 0, 0), as the
    WebUI and diffusers sample SDXL by default."""
    from lib_lora.training.backbone_sdxl import added_conditions, time_ids

    ids = time_ids(size_hw, (0, 0), size_hw).to(pooled.device).expand(pooled.shape[0], -1)

    def predict(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return backbone.predict_noise(x, t, cond, added_conditions(pooled, ids))

    return predict


def make_samples(
    backbone: Backbone,
    tokens: CaptionTokens,
    prompts: list[str],
    out_dir: Path,
    stem: str,
    *,
    size: tuple[int, int],
    steps: int,
    cfg_scale: float,
    negative: str,
    seed: int,
    clip_skip: int,
    amp_dtype: torch.dtype | None,
    network: nn.Module | None = None,
    progress: Progress | None = None,
    family: ModelFamily | None = None,
) -> list[tuple[Path, str]]:
    """One PNG per prompt, each from the same seed (so the images compare across steps);
    returns (path, prompt) pairs. Written atomically: a stopped run leaves no half image.
    `family`: the run's (schedule.for_run: a v-prediction or zero-terminal-SNR schedule samples
    as it trained); default the backbone's."""
    dev = backbone.device
    family = family or family_of(backbone)
    w, h = size
    down = family.vae_scale_factor
    out = []
    with eval_modes(backbone.unet, backbone.text_encoder, network), torch.no_grad():
        for i, prompt in enumerate(prompts):
            gen = torch.Generator("cpu").manual_seed(seed)
            noise = torch.randn((1, family.latent_channels, h // down, w // down), generator=gen).to(dev)
            with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                ids = tokens.batch([negative, prompt]).to(dev)
                encoded = backbone.encode_text(ids, clip_skip=clip_skip)
                predict = backbone.predict_noise
                if isinstance(encoded, tuple):  # SDXL: (cond, pooled), and the size conditioning
                    encoded, pooled = encoded
                    predict = added_predict(backbone, pooled.to(backbone.dtype), (h, w))
                uncond, cond = encoded.to(backbone.dtype).chunk(2)
                latents = denoise(predict, cond, uncond, noise.to(backbone.dtype), steps, cfg_scale,
                                  progress, family)  # fmt: skip
                pixels = backbone.decode_latents(latents)
            buf = io.BytesIO()
            to_image(pixels[0]).save(buf, format="PNG")
            path = atomic_write_bytes(out_dir / f"{stem}-{i:02d}.png", buf.getvalue())
            out.append((path, prompt))
    return out
