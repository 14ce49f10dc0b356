"""The standalone host: `python -m lib_lora ui` and the CLI, with no WebUI around.

It does itself what the WebUI does for the WebUI host: loads the base model (kept for the
next job), serialises jobs with a lock, and generates test images through a diffusers
StableDiffusionPipeline assembled from the backbone's own modules (no second copy), with
LoRAs named in the prompt the WebUI way (`<lora:name:weight>`) applied by our LoRANetwork.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lib_lora.errors import ModelLoadError, UserError
from lib_lora.names import validate_name
from lib_lora.progress import NullProgress, Progress, check_cancel
from lib_lora.training.family import SD15, ModelFamily, family_of

if TYPE_CHECKING:
    from PIL import Image

    from lib_lora.training.backbone import Backbone
    from lib_lora.training.lora import LoRANetwork

log = logging.getLogger(__name__)

LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([-+0-9.eE]+))?>")

# The WebUI's sampler names, as diffusers schedulers with SD1.5's noise schedule; the first is the default.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(sampler_name: str, family: ModelFamily = SD15) -> Any:
    """A diffusers scheduler for one of `SAMPLERS`, on the family's noise schedule (a UserError
    naming the choices otherwise)."""
    import diffusers

    if sampler_name not in SAMPLERS:
        raise UserError(f"Unknown sampler {sampler_name!r}; choose one of {', '.join(SAMPLERS)}.")
    cls_name, extra = SAMPLERS[sampler_name]
    cls = getattr(diffusers, cls_name)
    from lib_lora.training.schedule import family_scheduler

    return family_scheduler(cls, family, **extra)


def parse_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """'a photo <lora:zny:0.8>' -> ('a photo', [('zny', 0.8)]); the weight defaults to 1."""
    loras = [(m.group(1).strip(), float(m.group(2)) if m.group(2) else 1.0) for m in LORA_TAG.finditer(prompt)]
    text = re.sub(r"\s*,?\s*" + LORA_TAG.pattern, "", prompt).strip().strip(",").strip()
    return text, loras


def lora_shape(tensors: dict[str, Any]) -> tuple[int, float, int, float]:
    """(dim, alpha, conv_dim, conv_alpha) of a kohya LoRA from its tensors."""
    dim = alpha = None
    conv_dim, conv_alpha = 0, 1.0
    for key, t in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        base = key[: -len(".lora_down.weight")]
        a = tensors.get(base + ".alpha")
        rank = int(t.shape[0])
        value = float(a) if a is not None else float(rank)
        if t.ndim == 4 and t.shape[-1] == 3:
            conv_dim, conv_alpha = rank, value
        elif dim is None:
            dim, alpha = rank, value
    if dim is None:
        raise UserError("This file has no LoRA weights (no '.lora_down.weight' keys); is it a LoRA?")
    return dim, float(alpha), conv_dim, conv_alpha


class StandaloneHost:
    name = "standalone"

    def __init__(
        self,
        base_model: str = "tiny",
        output_dir: str | Path = "output",
        work_dir: str | Path = "work",
        device: str = "auto",
    ) -> None:
        self.base_model = base_model
        self._lora_dir = Path(output_dir).expanduser().resolve()
        self._work_dir = Path(work_dir).expanduser().resolve()
        self.device = device
        self._lock = threading.Lock()
        self._backbones: dict[str, Backbone] = {}
        self._model_lock = threading.Lock()

    # Where things live
    def lora_dir(self) -> Path:
        self._lora_dir.mkdir(parents=True, exist_ok=True)
        return self._lora_dir

    def work_dir(self) -> Path:
        self._work_dir.mkdir(parents=True, exist_ok=True)
        return self._work_dir

    # The model
    def _torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def backbone(self, base_model: str | None = None) -> Backbone:
        """Load the base model once and keep it (one model at a time, like the WebUI)."""
        key = base_model or self.base_model
        with self._model_lock:
            if key not in self._backbones:
                import torch

                from lib_lora.training.models_sdxl import load_backbone  # SD1.5 or SDXL, by the file

                device = self._torch_device()
                dtype = torch.float16 if device.startswith("cuda") else torch.float32
                self._backbones.clear()  # free the previous model before loading another
                self._backbones[key] = load_backbone(key, device=device, dtype=dtype)
            return self._backbones[key]

    # Jobs
    @contextlib.contextmanager
    def job(self, title: str) -> Iterator[Progress]:
        if not self._lock.acquire(timeout=0.1):
            raise UserError(f"Another job is running; '{title}' can start when it ends.")
        try:
            yield NullProgress()
        finally:
            self._lock.release()

    def tagger(self, threshold: float) -> Any | None:
        return None

    def after_save(self, lora_path: Path, progress: Progress | None = None) -> None:
        log.info("LoRA saved: %s", lora_path)

    # Test images
    def find_lora(self, name: str) -> Path:
        name = validate_name(name, "LoRA name")
        path = self.lora_dir() / f"{name}.safetensors"
        if path.is_file():
            return path
        raise UserError(f"No LoRA named {name!r} in {self.lora_dir()}; train it first or check the name.")

    def samplers(self) -> list[str]:
        return list(SAMPLERS)

    def generate(
        self,
        prompts: list[str],
        seed: int,
        negative_prompt: str = "",
        steps: int = 20,
        cfg_scale: float = 7.0,
        width: int = 512,
        height: int = 512,
        progress: Progress | None = None,
        **kw: Any,
    ) -> list[Image.Image]:
        """One image per prompt, each from the same seed, LoRAs taken from `<lora:name:w>`."""
        import torch
        from diffusers import StableDiffusionPipeline

        from lib_lora.training.schedule import for_run

        backbone = self.backbone(kw.get("base_model"))
        if family_of(backbone).extra_conditioning:
            raise UserError(f"The Test tab makes {family_of(backbone).label} images only in the WebUI so far; "
                            "try this LoRA there (or in ComfyUI).")
        vae = getattr(backbone, "vae", None)
        if vae is None:
            raise ModelLoadError("This base model was loaded without its VAE, so it cannot make test images.")
        if width % 8 or height % 8:
            raise UserError(f"Width and height must be multiples of 8 (got {width}x{height}).")
        parsed = [parse_lora_tags(prompt) for prompt in prompts]
        paths = {name: self.find_lora(name) for _, loras in parsed for name, _ in loras}
        family = for_run(family_of(backbone), *lora_schedule(paths.values()))
        scheduler = make_scheduler(kw.get("sampler_name") or next(iter(SAMPLERS)), family)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, unet=backbone.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        networks = LoadedLoras(backbone)  # a grid's cells share each file: read once, then only reweighted
        images = []

        def stop_between_steps(_pipe: Any, _step: int, _t: Any, tensors: dict) -> dict:
            # Stop within an image, not after it: one 512² image on a CPU takes minutes.
            check_cancel(progress)
            return tensors

        for i, (text, loras) in enumerate(parsed):
            check_cancel(progress)
            if progress is not None:
                progress.update(i, len(prompts), "generating test images")
            with networks.applied([(paths[name], weight) for name, weight in loras]):
                generator = torch.Generator(device="cpu").manual_seed(int(seed))
                with torch.no_grad():
                    out = pipe(
                        prompt=text, negative_prompt=negative_prompt or None, num_inference_steps=int(steps),
                        guidance_scale=float(cfg_scale), width=int(width), height=int(height), generator=generator,
                        output_type="pil", callback_on_step_end=stop_between_steps,
                    )
                images.append(out.images[0])
        if progress is not None:
            progress.update(len(prompts), len(prompts), "test images done")
        return images


def lora_schedule(paths: Iterable[Path]) -> tuple[bool, bool]:
    """(v_parameterization, zero_terminal_snr) the LoRAs were trained with, from their metadata
    (modelspec.prediction_type, or kohya's older ss_v_parameterization, and ss_zero_terminal_snr):
    a grid is sampled as its LoRAs' base model predicts, every cell alike. LoRAs that disagree
    cannot share one grid."""
    from lib_lora.training.export import read_metadata

    def on(value: Any) -> bool:
        return str(value).strip().lower() == "true"

    seen = set()
    for path in paths:
        md = read_metadata(path)
        v = md.get("modelspec.prediction_type") == "v" or on(md.get("ss_v_parameterization"))
        seen.add((v, on(md.get("ss_zero_terminal_snr"))))
    if len(seen) > 1:
        raise UserError("These LoRAs were trained for different noise schedules (v-prediction or zero terminal "
                        "SNR, in their metadata); test them in separate grids.")
    return next(iter(seen), (False, False))


class LoadedLoras:
    """The LoRA files of one generate() call, each read and built into a network once.

    A grid names the same file in every cell at another weight; reading the file and building
    the network per cell cost more than a small test image, so cells only set the multiplier.
    Nothing outlives the call: the next grid reads the file again, changed or not."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self._networks: dict[Path, LoRANetwork] = {}

    def network(self, path: Path) -> LoRANetwork:
        """The LoRANetwork of the file, built on first use (not applied)."""
        if path not in self._networks:
            from lib_lora.training.export import read_lora
            from lib_lora.training.lora import LoRANetwork

            tensors, meta = read_lora(path)
            if meta.get("ss_network_module") == "lycoris.kohya":  # LoCon, LoHa, LoKr, DoRA
                from lib_lora.training.lycoris_net import network_from_file

                net = network_from_file(self.backbone.lora_targets(conv=True), tensors, meta)
            else:
                dim, alpha, conv_dim, conv_alpha = lora_shape(tensors)
                targets = self.backbone.lora_targets(conv=conv_dim > 0)
                net = LoRANetwork(targets, dim=dim, alpha=alpha, conv_dim=conv_dim, conv_alpha=conv_alpha)
                net.load_kohya(tensors)
            if hasattr(net, "to"):  # the LoRA weights on the model's device and dtype
                net.to(device=self.backbone.device, dtype=self.backbone.dtype)
            self._networks[path] = net
        return self._networks[path]

    @contextlib.contextmanager
    def applied(self, loras: list[tuple[Path, float]]) -> Iterator[None]:
        """The files applied at their weights, removed again afterwards (on errors too).

        A file named twice is applied once at the sum of its weights: a LoRA's effect is linear
        in its multiplier, and one network cannot wrap the same modules twice."""
        weights: dict[Path, float] = {}
        for path, weight in loras:
            weights[path] = weights.get(path, 0.0) + weight
        applied = []
        try:
            for path, weight in weights.items():
                net = self.network(path)
                net.set_multiplier(weight)
                net.apply()
                applied.append(net)
            yield
        finally:
            for net in reversed(applied):
                net.remove()
