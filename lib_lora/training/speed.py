"""Speed pieces of the training loop (issue 8), kept apart from run.py so merges stay small.

- `StepFeeder` turns a `Batch` into device tensors with no host<->device round trip: latents
  live on the device (pinned host memory when they would not fit), caption token ids are
  built once per caption, text-encoder outputs are cached per token chunk (the family's
  77, carried by `tokens`) when the text encoder is not trained (both only when captions
  are the same every epoch: shuffled ones would fill the caches with entries never used
  again), and the seeded CPU noise is drawn into pinned memory so the copy is truly
  asynchronous. The noise recipe is exactly the loop's (same generator, same draw order), so
  a run is bit-identical with or without these caches on the CPU.
- `adamw_kwargs` picks torch AdamW's fused (else foreach) kernels where this torch has them;
  fused AdamW also lets fp16's GradScaler skip its per-step `found_inf.item()` sync.
- `apply_memory_format`, `compile_predict`: the opt-in channels_last and torch.compile.
- `enable_gradient_checkpointing`: what `gradient_checkpointing` turns on. Out-of-memory
  during a step is handled by issue 5's `guards.run_step` (`--oom-retry`: checkpointing,
  then a split batch), so the speed code adds no second OOM path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lib_lora.training.noise import NoiseRecipe
from lib_lora.training.noise import draw as draw_noise

log = logging.getLogger(__name__)

# Latents bigger than this stay in pinned host memory instead of on the GPU (SD1.5 at 512²:
# 64 KiB per image, so this holds ~8000 images).
DEVICE_LATENT_BUDGET = 512 * 2**20
COND_CACHE_LIMIT = 65536  # cached text-encoder chunks (each 77x768 half floats = 118 KiB on GPU)


@dataclass
class StepData:
    """One step's inputs, on the training device."""

    latents: torch.Tensor  # (B, 4, h, w) fp32
    noise: torch.Tensor  # (B, 4, h, w) fp32
    timesteps: torch.Tensor  # (B,) long
    ids: torch.Tensor  # (B, n*77) long
    cond: torch.Tensor | None  # (B, n*77, 768) in the backbone's dtype, or None: run the text encoder
    # Families with extra U-Net conditioning (SDXL): the pooled text embedding (cached with
    # `cond`, None when the text encoder runs) and each sample's size/crop time ids.
    pooled: torch.Tensor | None = None  # (B, pooled width) in the backbone's dtype
    time_ids: torch.Tensor | None = None  # (B, 6) fp32
    mask: torch.Tensor | None = None  # (B, 1, h, w) fp32 loss mask (masked_loss), None: unmasked
    # Per-sample loss weights (regularisation images: prior_loss_weight); None: all 1.
    loss_weights: torch.Tensor | None = None  # (B,) fp32


class StepFeeder:
    """Prepares each step's inputs; everything that can be done once is done once."""

    def __init__(
        self,
        latent_of: dict[int, torch.Tensor],
        tokens: Any,  # data.CaptionTokens
        device: torch.device,
        noise_gen: torch.Generator,
        num_timesteps: int,
        noise_offset: float = 0.0,
        encode_chunks: Callable[[torch.Tensor], torch.Tensor] | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
        fixed_captions: bool = True,
        time_ids: Callable[..., torch.Tensor] | None = None,
        noise: NoiseRecipe | None = None,
        mask_of: dict[int, torch.Tensor] | None = None,
        flipped_of: dict[int, torch.Tensor] | None = None,
        prior_loss_weight: float = 1.0,
    ) -> None:
        self.device = device
        self.tokens = tokens
        self.chunk = tokens.chunk_length  # ids per text-encoder chunk: the family's
        self.gen = noise_gen
        self.num_timesteps = num_timesteps
        self.noise_offset = noise_offset
        # noise.py's recipe (offset, its random strength, multires noise, the timestep range);
        # without one, the offset and the schedule's full range.
        self.noise = noise if noise is not None else NoiseRecipe(noise_offset, max_timestep=num_timesteps)
        self.encode_chunks = encode_chunks  # None while the text encoder is trained
        # False under shuffle_caption: a caption is new nearly every step, so caching its ids
        # or its text-encoder outputs would only grow the caches (and hash the keys) for nothing.
        self.fixed_captions = fixed_captions
        self.memory_format = memory_format
        self.time_ids = time_ids  # (items of one bucket, flips) -> (B, 6) time ids (SDXL), None for SD1.5
        self.prior_loss_weight = prior_loss_weight
        self.pin = device.type == "cuda"
        flipped_of = flipped_of or {}
        total = sum(t.numel() * t.element_size() for t in (*latent_of.values(), *flipped_of.values()))
        on_device = device.type != "cpu" and total <= DEVICE_LATENT_BUDGET
        self.latents_on_device = on_device
        self.latent_of = {k: self._place(v, on_device) for k, v in latent_of.items()}
        self.mask_of = {k: self._place(v, on_device) for k, v in mask_of.items()} if mask_of else None
        # Mirrored latents (flip_aug), placed like the others.
        self.flipped_of = {k: self._place(v, on_device) for k, v in flipped_of.items()}
        # Per caption, not per batch: with batches of 2 or more the same list of captions
        # rarely comes back (20 images at batch 4: 14 hits in 2000 steps); a caption always does.
        self._ids: dict[str, tuple[torch.Tensor, list[tuple[int, ...]]]] = {}
        self._cond: dict[tuple[int, ...], torch.Tensor] = {}
        self._pooled: dict[tuple[int, ...], torch.Tensor] = {}  # per chunk, beside _cond (SDXL)

    def _place(self, t: torch.Tensor, on_device: bool) -> torch.Tensor:
        if on_device:
            return t.to(self.device)
        return t.pin_memory() if self.pin else t

    def __call__(self, batch: Any) -> StepData:
        dev = self.device
        flips = getattr(batch, "flips", None) or []
        lat = [(self.flipped_of if flips and flips[i] else self.latent_of)[id(it)] for i, it in enumerate(batch.items)]
        latents = torch.stack(lat) if len(lat) > 1 else lat[0].unsqueeze(0)
        latents = latents.to(dev, non_blocking=True)
        # The loop's recipe (noise.draw): noise, the offset, timesteps, from one seeded CPU generator.
        noise, t = draw_noise(self.noise, latents.shape, self.gen, self.pin)
        noise, t = noise.to(dev, non_blocking=True), t.to(dev, non_blocking=True)
        mask = None
        if self.mask_of is not None:
            # a mirrored latent (flip_aug) is weighted by its mirrored mask
            m = [self.mask_of[id(it)].flip(-1) if flips and flips[i] else self.mask_of[id(it)]
                 for i, it in enumerate(batch.items)]
            mask = (torch.stack(m) if len(m) > 1 else m[0].unsqueeze(0)).to(dev, non_blocking=True)
        if self.memory_format is not torch.contiguous_format:
            latents = latents.contiguous(memory_format=self.memory_format)
            noise = noise.contiguous(memory_format=self.memory_format)
        ids, keys = self.ids(batch.captions)
        cond, pooled = self.conditioning(ids, keys) if self.encode_chunks is not None else (None, None)
        tids = self.time_ids(batch.items, flips).to(dev, non_blocking=True) if self.time_ids is not None else None
        weights = None
        if self.prior_loss_weight != 1.0 and any(getattr(it, "is_reg", False) for it in batch.items):
            w = [self.prior_loss_weight if it.is_reg else 1.0 for it in batch.items]
            weights = torch.tensor(w, dtype=torch.float32).to(dev, non_blocking=True)
        return StepData(latents, noise, t, ids, cond, pooled, tids, mask, weights)

    def ids(self, captions: Sequence[str]) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
        """(B, n*77) ids on the device, and each 77-id chunk as a host tuple (the cond cache
        key; [] when there is no text-encoder cache to look up)."""
        if not self.fixed_captions:
            return self._upload(self.tokens.batch(captions))
        parts = [self._caption_ids(c) for c in captions]
        if len(parts) == 1:
            return parts[0]
        width = max(row.shape[1] for row, _ in parts)
        if any(row.shape[1] < width for row, _ in parts):
            # Shorter captions get empty chunks, as CaptionTokens.batch pads them.
            empty, empty_keys = self._caption_ids("")
            parts = [(torch.cat([row] + [empty] * ((width - row.shape[1]) // self.chunk), dim=1),
                      keys + empty_keys * ((width - row.shape[1]) // self.chunk)) for row, keys in parts]  # fmt: skip
        return torch.cat([row for row, _ in parts]), [k for _, keys in parts for k in keys]

    def _caption_ids(self, caption: str) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
        """One fixed caption's (1, k*77) device ids and chunk keys, made on first use."""
        hit = self._ids.get(caption)
        if hit is None:
            hit = self._upload(self.tokens.batch([caption]))
            if len(self._ids) < COND_CACHE_LIMIT:
                self._ids[caption] = hit
        return hit

    def _upload(self, host: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
        rows, n = host.shape[0], host.shape[1] // self.chunk
        keys = [tuple(r) for r in host.view(rows * n, self.chunk).tolist()] if self.encode_chunks is not None else []
        return host.to(self.device), keys

    def cond(self, ids: torch.Tensor, keys: list[tuple[int, ...]]) -> torch.Tensor:
        """Text-encoder output of (B, n*77) ids, assembled from cached per-chunk outputs."""
        return self.conditioning(ids, keys)[0]

    def conditioning(self, ids: torch.Tensor, keys: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(text-encoder output of (B, n*77) ids, pooled embedding per row or None), assembled
        from cached per-chunk outputs.

        The loop encodes 77-token chunks independently, so a chunk's output depends only on
        its ids: caching per chunk is exact, and captions of any length share entries. A pooled
        embedding (SDXL) is the first chunk's, so it is cached per chunk too."""
        rows, width = ids.shape
        missing = list(dict.fromkeys(k for k in keys if k not in self._cond))
        fresh: dict[tuple[int, ...], torch.Tensor] = {}
        fresh_pooled: dict[tuple[int, ...], torch.Tensor] = {}
        if missing:
            with torch.no_grad():
                out, pooled = split_conditioning(self.encode_chunks(torch.tensor(missing, dtype=torch.long, device=self.device)))
            fresh = dict(zip(missing, out, strict=True))
            if pooled is not None:
                fresh_pooled = dict(zip(missing, pooled, strict=True))
            if self.fixed_captions and len(self._cond) + len(missing) <= COND_CACHE_LIMIT:
                self._cond.update(fresh)
                self._pooled.update(fresh_pooled)
        parts = [self._cond.get(k, fresh.get(k)) for k in keys]
        cond = torch.stack(parts).view(rows, width, -1)
        if not (fresh_pooled or self._pooled):
            return cond, None
        firsts = keys[:: width // self.chunk]  # each row's first chunk
        return cond, torch.stack([self._pooled.get(k, fresh_pooled.get(k)) for k in firsts])


def split_conditioning(encoded: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context, pooled or None) of what a backbone's `encode_text` returns: a tensor (SD1.5)
    or a (cond, pooled) pair (SDXL's TextConditioning)."""
    if isinstance(encoded, tuple):
        return encoded[0], encoded[1]
    return encoded, None


def text_chunk_encoder(
    backbone: Any, clip_skip: int, device: torch.device, amp_dtype: torch.dtype | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """(k, 77) ids -> (k, 77, 768) conditioning in the backbone's dtype, as the loop computes it
    (SDXL: a (cond, pooled) pair, both in the backbone's dtype)."""

    def encode(chunk_ids: torch.Tensor) -> Any:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = backbone.encode_text(chunk_ids, clip_skip=clip_skip)
            if isinstance(out, tuple):
                return type(out)(*(o.to(backbone.dtype) for o in out))
            return out.to(backbone.dtype)

    return encode


# ------------------------------------------------------------------------------------------
# Optimizer kernels

_FUSED_OK: dict[str, bool] = {}


def adamw_kwargs(device: torch.device | str) -> dict[str, bool]:
    """{'fused': True} where this torch has a fused AdamW for the device (CUDA; CPU since 2.4),
    else {'foreach': True} on CUDA, else {} (torch's default)."""
    kind = torch.device(device).type
    if kind not in _FUSED_OK:
        try:
            p = nn.Parameter(torch.zeros(4, device=device))
            opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
            p.grad = torch.ones_like(p)
            opt.step()
            _FUSED_OK[kind] = True
        except (RuntimeError, TypeError, ValueError):
            _FUSED_OK[kind] = False
    if _FUSED_OK[kind]:
        return {"fused": True}
    return {"foreach": True} if kind == "cuda" else {}


# ------------------------------------------------------------------------------------------
# Opt-in model transforms


def apply_memory_format(unet: nn.Module, channels_last: bool) -> tuple[torch.memory_format, Callable[[], None]]:
    """Move the U-Net's 4-d weights to channels_last (NHWC convolutions on tensor cores).

    Returns the inputs' format and a function that puts the weights back as they were: the
    U-Net may be a host's, which must be left exactly as found (a saved copy of a
    channels_last tensor is refused by safetensors, and the host's own kernels expect it)."""
    if not channels_last:
        return torch.contiguous_format, lambda: None
    was_dense = [p for p in unet.parameters() if p.dim() == 4 and p.is_contiguous()]
    unet.to(memory_format=torch.channels_last)

    def restore() -> None:
        for p in was_dense:
            p.data = p.data.contiguous()

    return torch.channels_last, restore


def compile_predict(predict: Callable, enabled: bool) -> Callable:
    """torch.compile of the backbone's noise prediction (the U-Net with its LoRA forwards).

    The model object is not replaced, so a host's model stays as it was; shapes change per
    bucket, which torch.compile handles with one recompile per bucket."""
    if not enabled:
        return predict
    return torch.compile(predict, dynamic=False)


# ------------------------------------------------------------------------------------------
# Gradient checkpointing


def enable_gradient_checkpointing(backbone: Any, text_encoder_too: bool) -> bool:
    """Turn on gradient checkpointing where the modules support it; True when the U-Net's is on."""
    on = False
    unet = backbone.unet
    if hasattr(backbone, "enable_gradient_checkpointing"):  # a host's own way (the WebUI's ldm U-Net)
        on = bool(backbone.enable_gradient_checkpointing())
    elif hasattr(unet, "enable_gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers only checkpoints in training mode; SD's U-Net has no dropout
        on = True
    for te in (backbone.text_encoder, getattr(backbone, "text_encoder_2", None)):  # SDXL has two
        if text_encoder_too and hasattr(te, "gradient_checkpointing_enable"):
            te.gradient_checkpointing_enable()
            te.train()
            if hasattr(te, "enable_input_require_grads"):
                te.enable_input_require_grads()
    return on
