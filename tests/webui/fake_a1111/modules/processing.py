"""Mirrors modules/processing.py: StableDiffusionProcessingTxt2Img, process_images, Processed.

The fake "generates" a flat image whose colour comes from the prompt, the seed and the LoRA
weight found in `<lora:name:w>` (checked against networks.available_networks, as the real
extra-network activation does), so tests can see what was asked for."""
import hashlib
import re
import sys
from dataclasses import dataclass, field

from PIL import Image

calls = []


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
    images = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        for name, _weight in re.findall(r"<lora:([^:>]+):([0-9.]+)>", prompt):
            if nets is None or name not in nets.available_networks:
                raise RuntimeError(f"networks with names not found: {name}")
        digest = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
        images.append(Image.new("RGB", (p.width, p.height), tuple(digest[:3])))
    calls.append({"prompts": prompts, "seeds": seeds, "steps": p.steps, "sampler": p.sampler_name})
    return Processed(p, images, seeds[0] if seeds else -1)
