"""Mirrors modules/processing.py: StableDiffusionProcessingTxt2Img, process_images, Processed.

The fake "generates" a flat image whose colour comes from the prompt, the seed and the LoRA
weight found in `<lora:name:w>` (checked against networks.available_networks, as the real
extra-network activation does), so tests can see what was asked for.

Interrupt as in v1.10.1: process_images_inner stops before the next image when
`state.interrupted` or `state.stopping_generation` is set; the sampler stops at the next step
when `state.interrupted` or `state.skipped` is set (sd_samplers_cfg_denoiser raises
InterruptedException, launch_sampling returns the latent so far) and that image is still
decoded and returned. Each step sets `state.sampling_step` and calls the test's `step_hooks`."""
import hashlib
import re
import sys
from dataclasses import dataclass, field

from PIL import Image

from modules import shared

calls = []
step_hooks = []  # test-only: hook(p, step) at every sampling step


@dataclass
class StableDiffusionProcessingTxt2Img:
    sd_model: object = None
    prompt: object = ""
    negative_prompt: str = ""
    seed: object = -1
    sampler_name: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    closed: bool = field(default=False, init=False)

    def close(self):
        self.closed = True


@dataclass
class Processed:
    p: object
    images_list: list
    seed: int = -1
    info: str = ""

    @property
    def images(self):
        return self.images_list


def process_images(p):
    prompts = p.prompt if isinstance(p.prompt, list) else [p.prompt] * (p.batch_size * p.n_iter)
    seeds = p.seed if isinstance(p.seed, list) else [int(p.seed) + i for i in range(len(prompts))]
    nets = sys.modules.get("networks")
    state = shared.state
    images = []
    steps_run = 0
    for prompt, seed in zip(prompts, seeds, strict=True):
        if state.interrupted or state.stopping_generation:
            break
        for name, _weight in re.findall(r"<lora:([^:>]+):([0-9.]+)>", prompt):
            if nets is None or name not in nets.available_networks:
                raise RuntimeError(f"networks with names not found: {name}")
        state.sampling_steps, state.sampling_step = p.steps, 0
        for step in range(p.steps):
            if state.interrupted or state.skipped:
                break
            state.sampling_step = step
            steps_run += 1
            for hook in step_hooks:
                hook(p, step)
        digest = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
        images.append(Image.new("RGB", (p.width, p.height), tuple(digest[:3])))
    calls.append({"prompts": prompts, "seeds": seeds, "steps": p.steps, "sampler": p.sampler_name,
                  "size": (p.width, p.height), "steps_run": steps_run})
    return Processed(p, images, seeds[0] if seeds else -1)
