"""Mirrors backend/patcher/lora.py: LoraLoader bakes LoRA patches into the weights (new
Parameters, made in inference mode) and keeps the originals in `backup` (moved to the offload
device); refresh() first restores every backup, then patches. merge_lora_to_weight: the plain
"lora" patch type (up @ down * alpha/rank * strength), as Forge computes it in float32."""
import torch

from backend import utils


def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    weight_dtype_backup = weight.dtype
    weight = weight.to(dtype=computation_dtype, copy=True)
    for strength, v, strength_model, _offset, _function in patches:
        patch_type, (up, down, alpha) = v
        assert patch_type == "lora"
        up, down = up.to(weight.device, computation_dtype), down.to(weight.device, computation_dtype)
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        weight = weight * strength_model + strength * scale * torch.mm(up.flatten(1), down.flatten(1)).reshape(weight.shape)
    return weight.to(dtype=weight_dtype_backup)


def get_parameter_devices(model):
    return {key: p.device for key, p in model.named_parameters()}


def set_parameter_devices(model, parameter_devices):
    for key, device in parameter_devices.items():
        p = utils.get_attr(model, key)
        if p.device != device:
            utils.set_attr_raw(model, key, utils.tensor2parameter(p.to(device=device)))
    return model


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        all_patches = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current_patches in patches.items():
                all_patches[(key, online_mode)] = all_patches.get((key, online_mode), []) + current_patches
        parameter_devices = get_parameter_devices(self.model)
        for m in set(self.online_backup):
            del m.forge_online_loras
        self.online_backup = []
        for k, w in self.backup.items():
            if not isinstance(w, torch.nn.Parameter):
                w = torch.nn.Parameter(w, requires_grad=False)
            utils.set_attr_raw(self.model, k, w)
        self.backup = {}
        set_parameter_devices(self.model, parameter_devices=parameter_devices)
        for (key, _online_mode), current_patches in all_patches.items():  # online mode: not imitated
            _parent, _child, weight = utils.get_attr_with_parent(self.model, key)
            assert isinstance(weight, torch.nn.Parameter)
            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)
            weight = merge_lora_to_weight(current_patches, weight, key, computation_dtype=torch.float32)
            utils.set_attr_raw(self.model, key, torch.nn.Parameter(weight, requires_grad=False))
        set_parameter_devices(self.model, parameter_devices=parameter_devices)
        self.loaded_hash = hashes
