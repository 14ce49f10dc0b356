"""Mirrors extensions-builtin/Lora/networks.py: loaded_networks, available_networks,
network_apply_weights (deltas added in place, a CPU backup kept), network_restore_weights_from_backup,
list_available_networks (scans cmd_opts.lora_dir)."""
import os

import torch
from modules import shared

loaded_networks = []
available_networks = {}


class FakeNetwork:
    """Test-only stand-in for network.Network: `modules` maps a layer name to its weight delta."""

    def __init__(self, name, deltas, multiplier=1.0):
        self.name = name
        self.modules = deltas
        self.te_multiplier = self.unet_multiplier = multiplier
        self.dyn_dim = None


def store_weights_backup(weight):
    return None if weight is None else weight.to("cpu", copy=True)


def restore_weights_backup(obj, field, weight):
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


def network_restore_weights_from_backup(self):
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    if weights_backup is not None:
        restore_weights_backup(self, "weight", weights_backup)
    restore_weights_backup(self, "bias", bias_backup)


def network_apply_weights(self):
    network_layer_name = getattr(self, "network_layer_name", None)
    if network_layer_name is None:
        return
    current_names = getattr(self, "network_current_names", ())
    wanted_names = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)
    if getattr(self, "network_weights_backup", None) is None and wanted_names != ():
        self.network_weights_backup = store_weights_backup(self.weight)
    if getattr(self, "network_bias_backup", None) is None and wanted_names != ():
        self.network_bias_backup = store_weights_backup(self.bias)
    if current_names != wanted_names:
        network_restore_weights_from_backup(self)
        for net in loaded_networks:
            delta = net.modules.get(network_layer_name)
            if delta is not None:
                with torch.no_grad():
                    self.weight.copy_((self.weight + delta * net.unet_multiplier).to(self.weight.dtype))
        self.network_current_names = wanted_names


def list_available_networks():
    available_networks.clear()
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for root, _, files in os.walk(shared.cmd_opts.lora_dir):
        for f in files:
            if f.endswith((".safetensors", ".pt", ".ckpt")):
                available_networks[os.path.splitext(f)[0]] = os.path.join(root, f)
