"""Mirrors backend/utils.py: get_attr, set_attr_raw, get_attr_with_parent, tensor2parameter."""
import torch


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def get_attr_with_parent(obj, attr):
    attrs = attr.split(".")
    parent = obj
    name = None
    for name in attrs:
        parent = obj
        obj = getattr(obj, name)
    return parent, name, obj


def set_attr_raw(obj, attr, value):
    attrs = attr.split(".")
    for name in attrs[:-1]:
        obj = getattr(obj, name)
    setattr(obj, attrs[-1], value)


def tensor2parameter(x):
    if isinstance(x, torch.nn.Parameter):
        return x
    return torch.nn.Parameter(x, requires_grad=False)
