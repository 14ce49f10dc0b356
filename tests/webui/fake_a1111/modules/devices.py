"""Mirrors modules/devices.py: device, dtype, dtype_unet, autocast(), torch_gc(), cpu."""
import contextlib

import torch

cpu = torch.device("cpu")
device = torch.device("cpu")
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
gc_calls = 0


def autocast(disable=False):
    # the real one returns torch.autocast("cuda") unless fp32/disabled; on the CPU: nothing
    return contextlib.nullcontext()


def torch_gc():
    global gc_calls
    gc_calls += 1
