"""Mirrors modules/lowvram.py: module_in_gpu, send_everything_to_cpu(), is_enabled()."""
import torch

module_in_gpu = None
cpu = torch.device("cpu")
calls = 0


def send_everything_to_cpu():
    global module_in_gpu, calls
    calls += 1
    if module_in_gpu is not None:
        module_in_gpu.to(cpu)
    module_in_gpu = None


def is_enabled(sd_model):
    return sd_model.lowvram
