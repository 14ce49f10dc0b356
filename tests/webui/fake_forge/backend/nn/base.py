"""Mirrors backend/nn/base.py: ModuleDict (children by name), ObjectDict (attributes by name)."""
import torch


class ModuleDict(torch.nn.Module):
    def __init__(self, module_dict):
        super().__init__()
        for name, module in module_dict.items():
            self.add_module(name, module)


class ObjectDict:
    def __init__(self, module_dict):
        for name, module in module_dict.items():
            setattr(self, name, module)
