"""Mirrors backend/patcher/clip.py: CLIP holds cond_stage_model (a JointTextEncoder of
IntegratedCLIPs keyed clip_l/clip_g), tokenizer (an ObjectDict) and its ModelPatcher."""
from backend import memory_management
from backend.nn.base import ModuleDict, ObjectDict
from backend.patcher.base import ModelPatcher


class JointTextEncoder(ModuleDict):
    pass


class CLIP:
    def __init__(self, model_dict={}, tokenizer_dict={}, no_init=False):  # noqa: B006 - Forge's signature
        if no_init:
            return
        load_device = memory_management.get_torch_device()
        offload_device = memory_management.cpu
        self.cond_stage_model = JointTextEncoder(model_dict)
        self.tokenizer = ObjectDict(tokenizer_dict)
        self.patcher = ModelPatcher(self.cond_stage_model, load_device=load_device, offload_device=offload_device)

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        return n

    def add_patches(self, *arg, **kwargs):
        return self.patcher.add_patches(*arg, **kwargs)
