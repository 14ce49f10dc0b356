"""By hand: write a single-file SD1.5 checkpoint with random weights and SD1.5's real shapes.

    python tests/webui/tools/make_sd15_shaped_checkpoint.py <out.safetensors> [--seed N] [--dtype fp16|fp32]

For starting a real WebUI (Forge, A1111) where no model hub can be reached: a host detects
SD1.5 from the state dict's shapes (Forge through huggingface_guess: 320 model channels, a
768-wide cross-attention, CLIP ViT-L's 12 x 768 text model), so the tiny model is not taken
for SD1.5 but this file is. Built by `tiny_model.random_single_file("sd15", full_size=True)`:
diffusers' UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextModel with SD1.5's
configs (lib_lora/training/configs), every weight drawn from its own generator seeded by the
seed and its name, converted to the compvis names (model.diffusion_model.*,
cond_stage_model.transformer.text_model.*, first_stage_model.*). Not part of the test suite
(about 860M parameters, 1.7 GB in fp16).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root: lib_lora
    from safetensors.torch import save_file

    from lib_lora.atomic import atomic_path
    from lib_lora.training.tiny_model import random_single_file

    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    sd = random_single_file("sd15", full_size=True, seed=args.seed)
    # float weights in the file's dtype (as a downloaded fp16 checkpoint); integer buffers stay
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    cross = sd["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape
    channels = sd["model.diffusion_model.input_blocks.0.0.weight"].shape[0]
    count = sum(v.numel() for v in sd.values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        save_file(sd, str(tmp), metadata={"fastlora_random_sd15": f"seed {args.seed}"})
    print(f"wrote {args.out}: {len(sd)} tensors, {count / 1e6:.0f}M values, {args.dtype}, "
          f"model channels {channels}, cross-attention {tuple(cross)}")
    return args.out


if __name__ == "__main__":
    main()
