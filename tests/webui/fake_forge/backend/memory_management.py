"""Mirrors backend/memory_management.py: current_loaded_models, LoadedModel (model_load moves the
patcher's model to its load device and bakes its LoRA patches with refresh_loras; model_unload
moves it to the offload device), load_models_gpu, unload_model_clones, free_memory,
unload_all_models, soft_empty_cache, get_torch_device. On one device (the CPU) Forge's
memory estimates never unload anything, so the stand-in keeps only the bookkeeping."""
import torch

cpu = torch.device("cpu")
torch_device = torch.device("cpu")
current_loaded_models = []
signal_empty_cache = False
empty_cache_calls = 0


def get_torch_device():
    return torch_device


def module_size(module, exclude_device=None, include_device=None, return_split=False):
    return sum(p.numel() * p.element_size() for p in module.parameters())


class LoadedModel:
    def __init__(self, model):
        self.model = model
        self.model_accelerated = False
        self.device = model.load_device
        self.inclusive_memory = 0
        self.exclusive_memory = 0

    def model_load(self, model_gpu_memory_when_using_cpu_swap=-1):
        self.real_model = self.model.forge_patch_model(self.device)
        self.model.current_device = self.model.load_device
        self.model.refresh_loras()
        return self.real_model

    def model_unload(self, avoid_model_moving=False):
        if avoid_model_moving:
            self.model.forge_unpatch_model()
        else:
            self.model.forge_unpatch_model(self.model.offload_device)

    def __eq__(self, other):
        return self.model is other.model


def unload_model_clones(model):
    to_unload = []
    for i in range(len(current_loaded_models)):
        if model.is_clone(current_loaded_models[i].model):
            to_unload = [i] + to_unload
    for i in to_unload:
        current_loaded_models.pop(i).model_unload(avoid_model_moving=True)


def free_memory(memory_required, device, keep_loaded=[], free_all=False):  # noqa: B006 - Forge's signature
    for i in range(len(current_loaded_models) - 1, -1, -1):
        shift_model = current_loaded_models[i]
        if free_all and shift_model.device == device and shift_model not in keep_loaded:
            current_loaded_models.pop(i).model_unload()


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    models_to_load = []
    for x in models:
        loaded_model = LoadedModel(x)
        if loaded_model in current_loaded_models:
            index = current_loaded_models.index(loaded_model)
            current_loaded_models.insert(0, current_loaded_models.pop(index))
        else:
            models_to_load.append(loaded_model)
    for loaded_model in models_to_load:
        unload_model_clones(loaded_model.model)
    for loaded_model in models_to_load:
        loaded_model.model_load(-1)
        current_loaded_models.insert(0, loaded_model)


def load_model_gpu(model):
    return load_models_gpu([model])


def soft_empty_cache(force=False):
    global signal_empty_cache, empty_cache_calls
    empty_cache_calls += 1
    signal_empty_cache = False


def unload_all_models():
    free_memory(1e30, get_torch_device(), free_all=True)
