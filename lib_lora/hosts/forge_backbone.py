"""The Backbones over Forge's loaded SD1.5 and SDXL models, trained in place, and Forge's state given back.

Forge (lllyasviel/stable-diffusion-webui-forge) replaces A1111's ldm model with its own
`backend`: `shared.sd_model.forge_objects` holds a `UnetPatcher` (its `.model` is a KModel whose
`diffusion_model` is Forge's U-Net, the ldm module tree under ldm's names), a `CLIP` (its
`cond_stage_model.clip_l.transformer` is transformers' CLIPTextModel, its `tokenizer.clip_l` the
tokenizer) and a `VAE` (`first_stage_model`, ldm's encoder/decoder, with `process_in/out` for
the latent scale). Its SDXL engine (`ForgeSDXLBackbone`) holds the same objects with two text
encoders, `clip_l` and `clip_g`, and the U-Net is sgm's tree (with `label_emb` for the `y`
vector). Their Linear layers are Forge's own `ForgeOperations.Linear`, which naming
and LoRAModule accept (`naming.is_linear`).

Two things differ from A1111, and `forge_training_state` handles both:
- Forge bakes a prompt's LoRAs into the weights (`LoraLoader.refresh` keeps the originals in
  its `backup`) when its memory manager loads a patcher carrying LoRA patches. We load the
  patchers of `forge_objects_original` (which carry none) through Forge's own
  `memory_management.load_models_gpu`, so Forge restores the original weights itself; at the
  end the patchers that were loaded before are loaded again, and Forge re-bakes their LoRAs
  with its own code on the same weights.
- Forge's memory manager moves and unloads models. The three parts are loaded on Forge's
  device at the job's start and, during the job, the VAE and text encoder are called directly
  (not through `VAE.encode` or the text engine, which would ask the manager to make room and
  could unload the U-Net we train on).

Forge is imported inside functions only: this module imports without Forge.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lib_lora.errors import UserError
from lib_lora.hosts.ldm_backbone import LdmBackbone, preserve_model_state, standalone_order, weights_hash
from lib_lora.training import naming
from lib_lora.training.backbone import encode_text_chunks
from lib_lora.training.backbone_sdxl import TextConditioning, encode_sdxl_text, te2_input_ids
from lib_lora.training.family import SDXL, ModelFamily

log = logging.getLogger(__name__)

TRAINABLE_STORAGE = (torch.float32, torch.float16, torch.bfloat16)
NO_LORAS = str([])  # LoraLoader.loaded_hash with nothing baked in


def is_forge_model(sd_model: Any) -> bool:
    return getattr(sd_model, "forge_objects", None) is not None


def _objects(sd_model: Any) -> Any:
    """The ForgeObjects without a generation's LoRA patches (`forge_objects_original`)."""
    return getattr(sd_model, "forge_objects_original", None) or sd_model.forge_objects


def _clip_parts(objs: Any) -> Any:
    return getattr(getattr(objs, "clip", None), "cond_stage_model", None)


def is_forge_sdxl(sd_model: Any) -> bool:
    """Forge's SDXL base engine: `is_sdxl`, and its CLIP holds both encoders (clip_l and clip_g;
    the refiner's holds clip_g alone)."""
    if not (is_forge_model(sd_model) and getattr(sd_model, "is_sdxl", False)):
        return False
    te = _clip_parts(_objects(sd_model))
    return all(getattr(getattr(te, k, None), "transformer", None) is not None for k in ("clip_l", "clip_g"))


def check_forge_trainable(sd_model: Any) -> None:
    """Raise a UserError saying why Forge's loaded model cannot be trained on here, if it cannot."""
    sdxl = getattr(sd_model, "is_sdxl", False)
    if sdxl and not is_forge_sdxl(sd_model):
        raise UserError("The loaded checkpoint is an SDXL refiner or another SDXL variant without SDXL base's two "
                        "text encoders; load an SDXL base model (or an SD1.5 one).")
    if not sdxl and not getattr(sd_model, "is_sd1", False):
        raise UserError("The loaded checkpoint is neither SD1.5 nor SDXL (Forge also loads SD2, SD3, Flux and others); "
                        "Fast LoRA trains SD1.5 and SDXL LoRAs in Forge: load one of those.")
    if getattr(sd_model, "is_inpaint", False):
        raise UserError("The loaded checkpoint is an inpainting model; load an SD1.5 or SDXL base model.")
    objs = _objects(sd_model)
    unet = getattr(getattr(getattr(objs, "unet", None), "model", None), "diffusion_model", None)
    clip_l = getattr(_clip_parts(objs), "clip_l", None)
    if unet is None or getattr(clip_l, "transformer", None) is None or getattr(objs, "vae", None) is None:
        family = "SDXL" if sdxl else "SD1.5"
        raise UserError(f"Forge's loaded model has no {family} U-Net, CLIP text encoder and VAE; load an {family} checkpoint.")
    if sdxl and getattr(sd_model, "embedder", None) is None:
        raise UserError("Forge's loaded SDXL model has no size/crop embedder (another Forge version?); "
                        "train this checkpoint in AUTOMATIC1111 or the standalone app.")
    storage = getattr(objs.unet.model, "storage_dtype", None)
    if storage is not None and storage not in TRAINABLE_STORAGE:
        raise UserError(f"Forge stores the loaded U-Net as {storage} (the 'Diffusion in Low Bits' setting); training "
                        "needs fp16, bf16 or fp32 weights: set it to Automatic and reload the checkpoint.")


def forge_backbone(sd_model: Any, **kwargs: Any) -> ForgeBackbone:
    """The Backbone over Forge's loaded model: `ForgeSDXLBackbone` for its SDXL engine, else `ForgeBackbone`."""
    return (ForgeSDXLBackbone if is_forge_sdxl(sd_model) else ForgeBackbone)(sd_model, **kwargs)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class ForgeBackbone(LdmBackbone):
    """`lib_lora.training.backbone.Backbone` over Forge's SD1.5 objects, weights used in place.

    The U-Net is ldm's tree, so LoRA targets, kohya names (the same as on A1111's model, the names
    Forge's LoRA loader maps onto this U-Net), initialisation order and gradient checkpointing
    are LdmBackbone's."""

    # LyCORIS wraps torch's nn.Linear only; Forge's layers are its own Linear class.
    network_types = ("lora",)
    network_refusal = ("{type} is not available in Forge yet (LyCORIS does not wrap Forge's layers): choose the "
                       "network type lora, or train in AUTOMATIC1111 or the standalone app.")

    def __init__(self, sd_model: Any, model_name: str = "", model_hash: str = "",
                 device: torch.device | None = None, model_legacy_hash: str = "") -> None:
        objs = _objects(sd_model)
        self.sd_model = sd_model
        self.forge = objs
        self.unet = objs.unet.model.diffusion_model
        self.text_encoder = objs.clip.cond_stage_model.clip_l.transformer
        self.tokenizer = objs.clip.tokenizer.clip_l
        self.vae = objs.vae.first_stage_model
        self.device = torch.device(device if device is not None else objs.unet.load_device)
        self.dtype = next(self.unet.parameters()).dtype
        self.model_name = model_name
        self.model_hash = model_hash
        self.model_legacy_hash = model_legacy_hash

    @functools.cached_property
    def vae_identity(self) -> str:
        """LdmBackbone's: Forge's VAE is ldm's tree under ldm's names and makes the same latents
        (scale applied the same way), so a latent cache is shared with A1111 for the same VAE."""
        return weights_hash(f"ldm-vae|{self.vae_dtype()}", self.vae)

    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    # The VAE's own methods, as Forge's StableDiffusion.encode_first_stage / decode_first_stage
    # use them, without VAE.encode's call into the memory manager (see the module's docstring).
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(_device_of(self.vae), self.vae_dtype())
        return self.vae.process_in(self.vae.encode(x)).to(self.device, torch.float32)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        z = self.vae.process_out(latents.to(_device_of(self.vae), self.vae_dtype()))
        return self.vae.decode(z).to(self.device, torch.float32)

    def encode_text(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        ids = input_ids.to(_device_of(self.text_encoder))  # Forge may keep the text encoder elsewhere
        return encode_text_chunks(self.text_encoder, ids, clip_skip, family=self.family).to(self.device)

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # a fresh transformer_options: Forge's forward writes into it (its default is a shared dict)
        return self.unet(noisy_latents, timesteps, context=cond, transformer_options={})


class ForgeSDXLBackbone(ForgeBackbone):
    """`lib_lora.training.backbone_sdxl.SDXLBackbone`'s interface over Forge's SDXL engine
    (backend/diffusion_engine/sdxl.py: StableDiffusionXL), weights used in place.

    Forge holds both text encoders as transformers' CLIPTextModel (`clip.cond_stage_model.clip_l`
    and `.clip_g`, bigG with a `text_projection` Linear), so, unlike on A1111's sgm model, text
    encoder 2 is trained too (`lora_te2_`), as by the standalone backbone and kohya. What it
    computes is what Forge's get_learned_conditioning gives the U-Net: crossattn = both
    encoders' penultimate hidden states side by side, vector = clip_g's projected pooled output
    followed by Forge's own `embedder` (Timestep) over the six size/crop values; the pooled
    output is taken as the standalone backbone takes it (kohya's: the final-normed state at the
    first end-of-text token), which is Forge's for captions without textual-inversion tokens."""

    family: ModelFamily = SDXL

    def __init__(self, sd_model: Any, model_name: str = "", model_hash: str = "",
                 device: torch.device | None = None, model_legacy_hash: str = "") -> None:
        super().__init__(sd_model, model_name, model_hash, device, model_legacy_hash)
        self.text_encoder_2 = self.forge.clip.cond_stage_model.clip_g.transformer
        self.tokenizer_2 = self.forge.clip.tokenizer.clip_g
        self.embedder = sd_model.embedder

    @functools.cached_property
    def vae_identity(self) -> str:
        """SgmBackbone's: Forge's VAE is ldm's tree under ldm's names and scales latents by SDXL's
        factor, so a latent cache is shared with A1111's SDXL model for the same VAE."""
        return weights_hash(f"sgm-vae|{self.vae_dtype()}|{self.vae.scaling_factor}", self.vae)

    def encode_text(self, input_ids: torch.Tensor, clip_skip: int = 1,
                    input_ids_2: torch.Tensor | None = None) -> TextConditioning:
        """Token ids (B, n*77) -> (context (B, n*77, TE1 + TE2 width), pooled (B, TE2 projection)):
        `encode_sdxl_text`, the standalone backbone's computation, over Forge's encoders.
        clip_skip does not apply to SDXL (Forge's engines fix it at the penultimate layer too)."""
        del clip_skip
        te_device = _device_of(self.text_encoder)  # Forge may keep the text encoders elsewhere
        ids = input_ids.to(te_device)
        if input_ids_2 is None:
            pad = self.tokenizer_2.pad_token_id
            input_ids_2 = te2_input_ids(ids, self.tokenizer.eos_token_id, 0 if pad is None else pad)
        out = encode_sdxl_text(self.text_encoder, self.text_encoder_2, ids, input_ids_2.to(te_device),
                               self.tokenizer_2.eos_token_id)
        return TextConditioning(out.cond.to(self.device), out.pooled.to(self.device))

    def y_vector(self, added: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forge's `vector`: the pooled output, then `embedder` of each of the six time ids
        (original height, width, crop top, left, target height, width), concatenated per sample."""
        pooled, ids = added["text_embeds"], added["time_ids"].to(self.device)
        flat = self.embedder(ids.reshape(-1)).reshape(ids.shape[0], -1)
        return torch.cat([pooled, flat.to(pooled)], dim=1).to(self.dtype)

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
                      added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if added is None:
            raise ValueError("the SDXL U-Net needs its added conditioning (pooled text embedding and time ids)")
        return self.unet(noisy_latents, timesteps, context=cond, y=self.y_vector(added), transformer_options={})

    def lora_targets(self, conv: bool = False) -> list[naming.Target]:
        """U-Net targets under kohya's SDXL (compvis) names in the standalone backbone's order, then
        TE1's (`lora_te1_`) and TE2's (`lora_te2_`): the names Forge's key map sends onto its U-Net,
        clip_l and clip_g."""
        fam = self.family
        unet = naming.unet_targets(self.unet, conv, fam.unet_prefix, fam.unet_key_space)
        out = standalone_order(unet, fam.unet_prefix, fam)
        for spec, te in zip(fam.text_encoders, (self.text_encoder, self.text_encoder_2), strict=True):
            out += naming.text_encoder_targets(te, spec.kohya_prefix)
        return out


# --------------------------------------------------------------------------------------------
# Forge's state: what the job changes, given back


def _memory_management() -> Any:
    return importlib.import_module("backend.memory_management")


def _lora_hash(patcher: Any) -> str:
    return str(list(patcher.lora_patches.keys()))


def _baked(sd_model: Any) -> list[tuple[Any, Any]]:
    """(LoraLoader, the patcher whose patches it has baked in) for each part with LoRAs in its weights."""
    sets = [getattr(sd_model, a, None) for a in ("forge_objects", "forge_objects_after_applying_lora",
                                                 "forge_objects_original")]
    out = []
    for part in ("unet", "clip"):
        patchers = [getattr(getattr(s, part, None), "patcher", getattr(s, part, None)) for s in sets if s is not None]
        patchers = [p for p in patchers if p is not None and hasattr(p, "lora_loader")]
        if not patchers:
            continue
        loader = patchers[0].lora_loader
        if loader.loaded_hash == NO_LORAS:
            continue
        source = next((p for p in patchers if _lora_hash(p) == loader.loaded_hash), None)
        out.append((loader, source))
    return out


def _no_inference_tensors(root: nn.Module) -> int:
    """Replace parameters that are inference tensors by normal copies (same bytes).

    Forge bakes LoRAs and moves weights inside torch.inference_mode, which makes inference
    tensors; autograd cannot save them for the backward pass, so a LoRA around such a layer
    could not be trained. Each copy replaces its original at once (memory: one tensor more)."""
    count = 0
    for module in root.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_inference():
                module._parameters[name] = nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                count += 1
    return count


def _copy_input(module: nn.Module, args: tuple) -> tuple | None:
    if not torch.is_grad_enabled():
        return None  # sampling: nothing is saved for a backward pass
    return (args[0].clone(), *args[1:])


@contextlib.contextmanager
def autograd_safe(unet: nn.Module) -> Iterator[None]:
    """Forge's U-Net is inference code (ComfyUI's port): each BasicTransformerBlock adds its
    attention outputs to its input in place (`x += n`) after the LayerNorm before it saved that
    input for the backward pass, so autograd refuses the backward. For the job, each block's
    norms take a copy of their input (a forward pre-hook, only while grad is on), and the blocks
    use PyTorch's scaled-dot-product attention (Forge's choice of attention, the sub-quadratic
    or split kernels on some set-ups, is inference-only code too; A1111's training also undoes
    its attention optimizations). Both are given back afterwards."""
    handles = []
    for block in unet.modules():
        if type(block).__name__ == "BasicTransformerBlock":
            for name in ("norm1", "norm2", "norm3"):
                norm = getattr(block, name, None)
                if isinstance(norm, nn.Module):
                    handles.append(norm.register_forward_pre_hook(_copy_input))
    module = sys.modules.get(type(unet).__module__)
    attention = sys.modules.get("backend.attention")
    old = getattr(module, "attention_function", None)
    sdpa = getattr(attention, "attention_pytorch", None)
    swap = old is not None and sdpa is not None and old is not sdpa
    if swap:
        module.attention_function = sdpa
    try:
        yield
    finally:
        if swap:
            module.attention_function = old
        for handle in handles:
            handle.remove()


def _index_of(models: list, patcher: Any) -> int | None:
    return next((i for i, lm in enumerate(models) if lm.model is patcher), None)


@contextlib.contextmanager
def forge_training_state(sd_model: Any) -> Iterator[None]:
    """Forge's loaded model ready for in-place LoRA training, and given back afterwards.

    On entry: the three parts of `forge_objects_original` loaded through Forge's memory manager
    (which takes the LoRAs the last generation baked in back out), weights and U-Net made usable
    by autograd (`autograd_safe`), every parameter frozen, eval mode. On exit, on success, error or interrupt: the patchers that
    were loaded before are loaded again in their order (Forge re-bakes their LoRAs itself), ours
    that were not are unloaded, and every hook, forward override, flag and requires_grad of the
    module trees is restored."""
    check_forge_trainable(sd_model)
    mm = _memory_management()
    objs = _objects(sd_model)
    ours = [objs.unet, objs.clip.patcher, objs.vae.patcher]
    loaded_before = [lm.model for lm in mm.current_loaded_models]
    baked = _baked(sd_model)
    roots = [objs.unet.model, objs.clip.cond_stage_model, objs.vae.first_stage_model]
    try:
        with contextlib.ExitStack() as stack:
            mm.load_models_gpu(ours)
            for loader, _ in baked:  # loaded already, or a LoRA baked in by another way: take it out
                if loader.loaded_hash != NO_LORAS:
                    loader.refresh(lora_patches={}, offload_device=objs.unet.offload_device)
            copied = sum(_no_inference_tensors(r) for r in roots)
            if copied:
                log.info("Fast LoRA: %d of Forge's weights were inference tensors; copied for training", copied)
            for root in roots:
                stack.enter_context(preserve_model_state(root))
            stack.enter_context(autograd_safe(objs.unet.model.diffusion_model))
            yield
    except BaseException:
        # The job's own error (or a stop) is what the user must see: a give-back error after it is logged.
        try:
            _give_back(mm, ours, loaded_before, baked)
        except Exception:  # noqa: BLE001 - logged; the job's error goes on
            log.exception("Fast LoRA: giving Forge its model back after the job's error failed")
        finally:
            gc.collect()
            mm.soft_empty_cache()
        raise
    else:
        try:
            _give_back(mm, ours, loaded_before, baked)
        finally:
            gc.collect()
            mm.soft_empty_cache()


def _give_back(mm: Any, ours: list, loaded_before: list, baked: list[tuple[Any, Any]]) -> None:
    """Each step of the give-back is tried even when one before it failed (a reload that runs
    out of memory must not leave our patchers loaded or a LoRA unbaked); the first error is
    raised after the last step."""
    errors: list[BaseException] = []

    def attempt(step: Callable[[], Any]) -> None:
        try:
            step()
        except Exception as err:  # noqa: BLE001 - raised below, after the other steps
            errors.append(err)

    if loaded_before:
        attempt(lambda: mm.load_models_gpu(loaded_before))  # re-bakes their LoRAs, on their device
    for patcher in ours:
        if not any(patcher is m for m in loaded_before):
            i = _index_of(mm.current_loaded_models, patcher)
            if i is not None:
                attempt(mm.current_loaded_models.pop(i).model_unload)
    for loader, source in baked:  # a patcher that was not loaded had its LoRAs baked in all the same
        if source is not None and loader.loaded_hash != _lora_hash(source):
            attempt(lambda loader=loader, source=source: loader.refresh(
                lora_patches=source.lora_patches, offload_device=source.offload_device, force_refresh=True))
    order = {id(m): i for i, m in enumerate(loaded_before)}
    mm.current_loaded_models.sort(key=lambda lm: order.get(id(lm.model), len(order)))
    if errors:
        raise errors[0]
