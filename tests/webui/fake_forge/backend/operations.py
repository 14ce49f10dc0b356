"""Mirrors backend/operations.py: ForgeOperations.Linear (a plain nn.Module with nn.Linear's
attributes, not an nn.Linear), ForgeOperations.Conv2d (an nn.Conv2d), using_forge_operations
(swaps torch.nn's classes while a model is built). Manual casting is left out: the stand-in's
weights are stored in the computation dtype."""
import contextlib

import torch

current_device = None
current_dtype = None
current_manual_cast_enabled = False


class ForgeOperations:
    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features, *args, **kwargs):
            super().__init__()
            self.in_features = in_features
            self.out_features = out_features
            # Forge starts with weight None and a `dummy`, filled by _load_from_state_dict; the
            # stand-in makes the tensors at once (same names, same shapes).
            self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, device=current_device,
                                                         dtype=current_dtype))
            self.scale_weight = None
            bias = kwargs.get("bias", args[0] if args else True)
            self.bias = torch.nn.Parameter(torch.zeros(out_features, device=current_device, dtype=current_dtype)) \
                if bias else None
            self.parameters_manual_cast = current_manual_cast_enabled
            torch.nn.init.normal_(self.weight, std=0.02)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight, self.bias)

    class Conv2d(torch.nn.Conv2d):
        def __init__(self, *args, **kwargs):
            kwargs["device"] = current_device
            kwargs["dtype"] = current_dtype
            super().__init__(*args, **kwargs)
            self.parameters_manual_cast = current_manual_cast_enabled

        def forward(self, x):
            return super()._conv_forward(x, self.weight, self.bias)


@contextlib.contextmanager
def using_forge_operations(operations=None, device=None, dtype=None, manual_cast_enabled=False, bnb_dtype=None):
    global current_device, current_dtype, current_manual_cast_enabled
    current_device, current_dtype, current_manual_cast_enabled = device, dtype, manual_cast_enabled
    if operations is None:
        operations = ForgeOperations
    op_names = ["Linear", "Conv2d"]
    backups = {op_name: getattr(torch.nn, op_name) for op_name in op_names}
    try:
        for op_name in op_names:
            setattr(torch.nn, op_name, getattr(operations, op_name))
        yield
    finally:
        for op_name in op_names:
            setattr(torch.nn, op_name, backups[op_name])
