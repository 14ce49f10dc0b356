"""WebUI tests: a WebUI-shaped ldm model with the tiny checkpoint's weights, and the fake
`modules` package (tests/webui/fake_a1111) put on sys.path for the tests that need it."""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path

import pytest
import torch
from ldm_shapes import TINY_LDM_UNET_KWARGS, TINY_LDM_VAE_KWARGS, LdmVAE
from torch import nn

FAKE_ROOT = Path(__file__).parent / "fake_a1111"


# --------------------------------------------------------------------------------------------
# The model object A1111 holds in shared.sd_model, built from the real ldm classes.


class AutoencoderKLShape(LdmVAE):
    """ldm.models.autoencoder.AutoencoderKL (encoder, decoder, quant convs; encode -> posterior, decode).
    The real class needs pytorch_lightning, which A1111 has and our test venv does not."""

    def encode(self, x):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


class DiffusionWrapperShape(nn.Module):
    """ldm.models.diffusion.ddpm.DiffusionWrapper: holds `diffusion_model`."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet
        self.conditioning_key = "crossattn"

    def forward(self, x, t, c_concat=None, c_crossattn=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class EmbeddingsWithFixesShape(nn.Module):
    """modules.sd_hijack.EmbeddingsWithFixes: A1111 wraps the token embedding (fixes=None)."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, input_ids):
        return self.wrapped(input_ids)


class FrozenCLIPEmbedderShape(nn.Module):
    """ldm.modules.encoders.modules.FrozenCLIPEmbedder: `.transformer`, `.tokenizer`."""

    def __init__(self, transformer: nn.Module, tokenizer):
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer


class CustomWordsShape(nn.Module):
    """modules.sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords: `.wrapped`, and a forward that
    parses prompt emphasis - training must never call it on captions."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, texts):
        raise AssertionError("training must tokenize captions itself, not call cond_stage_model(texts)")


class LatentDiffusionShape(nn.Module):
    """ldm.models.diffusion.ddpm.LatentDiffusion as A1111 holds it (attributes and the
    first-stage methods, whose bodies are ldm's)."""

    def __init__(self, unet, vae, cond_stage_model):
        super().__init__()
        self.model = DiffusionWrapperShape(unet)
        self.first_stage_model = vae
        self.cond_stage_model = cond_stage_model
        self.scale_factor = 0.18215
        self.is_sd1, self.is_sd2, self.is_sdxl = True, False, False
        self.lowvram = False

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    @torch.no_grad()
    def decode_first_stage(self, z):
        z = 1.0 / self.scale_factor * z
        return self.first_stage_model.decode(z)

    def get_first_stage_encoding(self, encoder_posterior):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise NotImplementedError(type(encoder_posterior))
        return self.scale_factor * z


def build_webui_model(checkpoint: Path, dtype: torch.dtype = torch.float32) -> LatentDiffusionShape:
    """The WebUI-shaped model with exactly the weights of the tiny single-file checkpoint."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextModel

    from lib_lora.training.models import read_state_dict
    from lib_lora.training.tiny_model import tiny_clip_config
    from lib_lora.training.tokenizer import load_clip_tokenizer

    sd = read_state_dict(checkpoint)
    unet = UNetModel(**TINY_LDM_UNET_KWARGS)
    vae = AutoencoderKLShape(TINY_LDM_VAE_KWARGS)
    clip = CLIPTextModel(tiny_clip_config())

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    unet.load_state_dict(part("model.diffusion_model."))
    vae.load_state_dict(part("first_stage_model."))
    te = part("cond_stage_model.transformer.")
    te.pop("text_model.embeddings.position_ids", None)
    missing, unexpected = clip.load_state_dict(te, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    emb = clip.text_model.embeddings
    emb.token_embedding = EmbeddingsWithFixesShape(emb.token_embedding)  # as sd_hijack does
    cond = CustomWordsShape(FrozenCLIPEmbedderShape(clip, load_clip_tokenizer()))
    model = LatentDiffusionShape(unet, vae, cond).to(dtype)
    model.eval()
    # A1111 leaves requires_grad on (it never trains these); the host must freeze them itself.
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _state_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _grad_flags(module: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in module.named_parameters()}


@pytest.fixture
def state_hash():
    """sha256 over a module's whole state dict (names and raw bytes)."""
    return _state_hash


@pytest.fixture
def grad_flags():
    return _grad_flags


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from lib_lora.training.tiny_model import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


@pytest.fixture
def webui_model(tiny_checkpoint) -> LatentDiffusionShape:
    return build_webui_model(tiny_checkpoint)


# --------------------------------------------------------------------------------------------
# The fake WebUI


class FakeWebUI:
    """Handles on the fake `modules` package, configured for one test."""

    def __init__(self, root: Path):
        self.root = root
        self.shared = importlib.import_module("modules.shared")
        self.paths = importlib.import_module("modules.paths")
        self.call_queue = importlib.import_module("modules.call_queue")
        self.sd_hijack = importlib.import_module("modules.sd_hijack")
        self.processing = importlib.import_module("modules.processing")
        self.progress = importlib.import_module("modules.progress")
        self.lowvram = importlib.import_module("modules.lowvram")
        self.devices = importlib.import_module("modules.devices")
        self.deepbooru = importlib.import_module("modules.deepbooru")
        self.script_callbacks = importlib.import_module("modules.script_callbacks")
        self.networks = importlib.import_module("networks")
        self.paths.models_path = str(root / "models")
        self.paths.data_path = str(root)
        self.shared.cmd_opts.lora_dir = str(root / "models" / "Lora")


def _drop_fake_modules() -> None:
    for name in list(sys.modules):
        if name == "modules" or name.startswith("modules.") or name == "networks":
            del sys.modules[name]
    for name in [n for n in sys.modules if n.startswith("lib_lora.hosts.webui") and n != "lib_lora.hosts.webui_requirements"]:
        del sys.modules[name]


@pytest.fixture
def webui(tmp_path):
    _drop_fake_modules()
    sys.path.insert(0, str(FAKE_ROOT))
    try:
        fake = FakeWebUI(tmp_path)
        fake.sd_hijack.apply_optimizations()  # the WebUI starts with its attention optimization on
        yield fake
    finally:
        hijack = sys.modules.get("modules.sd_hijack")
        if hijack is not None:
            hijack.undo_optimizations()  # ldm's class is shared by every test
        sys.path.remove(str(FAKE_ROOT))
        _drop_fake_modules()


# --------------------------------------------------------------------------------------------
# The SDXL model object A1111 holds (an sgm DiffusionEngine), from the stand-in in fake_sgm.


def _load_fake_sgm():
    import importlib.util

    if "fake_sgm" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fake_sgm", Path(__file__).parent / "fake_sgm" / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["fake_sgm"] = module
        spec.loader.exec_module(module)
    return sys.modules["fake_sgm"]


fake_sgm = _load_fake_sgm()


def build_sgm_model(checkpoint: Path, dtype: torch.dtype = torch.float32):
    """The WebUI-shaped SDXL model with exactly the weights of the tiny-sdxl single file."""
    from transformers import CLIPTextModel

    from lib_lora.training.models import read_state_dict
    from lib_lora.training.tiny_model import sdxl_configs
    from lib_lora.training.tokenizer import load_clip_tokenizer

    sd = read_state_dict(checkpoint)
    _, _, te1_cfg, te2_cfg = sdxl_configs()

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    unet = fake_sgm.UNetModel(**fake_sgm.TINY_SGM_UNET_KWARGS)
    unet.load_state_dict(part("model.diffusion_model."))
    vae = AutoencoderKLShape(TINY_LDM_VAE_KWARGS)
    vae.load_state_dict(part("first_stage_model."))
    clip = CLIPTextModel(te1_cfg)
    te = part("conditioner.embedders.0.transformer.")
    te.pop("text_model.embeddings.position_ids", None)
    missing, unexpected = clip.load_state_dict(te, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    tower = fake_sgm.OpenCLIPTextTower(te2_cfg.hidden_size, te2_cfg.num_hidden_layers, te2_cfg.num_attention_heads)
    tower.load_state_dict(part("conditioner.embedders.1.model."))
    time_dim = (unet.label_emb[0][0].in_features - te2_cfg.hidden_size) // 6
    embedders = [fake_sgm.FrozenCLIPEmbedder(clip, load_clip_tokenizer()), fake_sgm.FrozenOpenCLIPEmbedder2(tower),
                 *(fake_sgm.ConcatTimestepEmbedderND(time_dim, key) for key in
                   ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"))]
    model = fake_sgm.DiffusionEngine(unet, vae, fake_sgm.GeneralConditioner(embedders)).to(dtype)
    assert not [k for k in sd if not k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner."))]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)  # as A1111 leaves them
    return model


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint() -> Path:
    from lib_lora.training.tiny_model import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(family="sdxl")


@pytest.fixture
def sgm_model(tiny_sdxl_checkpoint):
    return build_sgm_model(tiny_sdxl_checkpoint)


@pytest.fixture(scope="module")
def sgm_model_read_only(tiny_sdxl_checkpoint):
    """One stand-in per module, for tests that only read it."""
    return build_sgm_model(tiny_sdxl_checkpoint)


# --------------------------------------------------------------------------------------------
# Forge: its `backend` stand-in (tests/webui/fake_forge) next to the fake `modules` package,
# and the StableDiffusion engine Forge holds in shared.sd_model, with the tiny checkpoint's weights.

FORGE_ROOT = Path(__file__).parent / "fake_forge"


def _drop_fake_backend() -> None:
    for name in list(sys.modules):
        if name == "backend" or name.startswith("backend."):
            del sys.modules[name]


def build_forge_model(checkpoint: Path):
    """Forge's SD1.5 engine (backend.diffusion_engine.sd15.StableDiffusion) as its loader builds
    it: U-Net and CLIP constructed under `using_forge_operations` (Forge's own Linear layers),
    then the checkpoint's weights loaded."""
    from backend.diffusion_engine.sd15 import StableDiffusion
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.operations import using_forge_operations
    from transformers import CLIPTextModel

    from lib_lora.training.models import read_state_dict
    from lib_lora.training.tiny_model import tiny_clip_config
    from lib_lora.training.tokenizer import load_clip_tokenizer

    sd = read_state_dict(checkpoint)

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    cpu = torch.device("cpu")
    with using_forge_operations(device=cpu, dtype=torch.float32):
        unet = IntegratedUNet2DConditionModel(**TINY_LDM_UNET_KWARGS)
        clip = IntegratedCLIP(CLIPTextModel, tiny_clip_config(), add_text_projection=True)
    unet.load_state_dict(part("model.diffusion_model."))
    unet.storage_dtype = unet.computation_dtype = torch.float32
    unet.load_device = unet.offload_device = unet.initial_device = cpu
    te = {f"transformer.{k}": v for k, v in part("cond_stage_model.transformer.").items()}
    te.pop("transformer.text_model.embeddings.position_ids", None)  # a buffer in transformers 4.30, not in 4.46
    missing, unexpected = clip.load_state_dict(te, strict=False)
    # the keys Forge's loader ignores too: text_projection (SD1.5 has none), position_ids, logit_scale
    assert not unexpected and all(k.endswith(("position_ids", "text_projection.weight", "logit_scale")) for k in missing)
    ldm_vae = AutoencoderKLShape(TINY_LDM_VAE_KWARGS)
    ldm_vae.load_state_dict(part("first_stage_model."))
    vae = IntegratedAutoencoderKL(ldm_vae)
    model = StableDiffusion(None, {"unet": unet, "text_encoder": clip, "vae": vae, "tokenizer": load_clip_tokenizer(),
                                   "scheduler": None})
    for m in (unet, clip, vae):
        m.eval()
        for p in m.parameters():
            p.requires_grad_(True)  # Forge never freezes them; the host must
    return model


@pytest.fixture
def forge_backend():
    """Forge's `backend` stand-in importable (no model built)."""
    _drop_fake_backend()
    sys.path.insert(0, str(FORGE_ROOT))
    try:
        yield importlib.import_module("backend.memory_management")
    finally:
        sys.path.remove(str(FORGE_ROOT))
        _drop_fake_backend()


def _as_forge(webui, forge_backend, build):
    """The fake WebUI as Forge with the engine `build()` makes loaded, until the test ends."""
    webui.sd_hijack.undo_optimizations()  # A1111's hijack of ldm's classes is no part of Forge
    webui.backend_mm = forge_backend
    webui.shared.sd_model = build()
    try:
        yield webui
    finally:
        webui.shared.sd_model = None


@pytest.fixture
def forge(webui, forge_backend, tiny_checkpoint):
    """The fake WebUI as Forge: `backend` importable and shared.sd_model Forge's SD1.5 engine."""
    yield from _as_forge(webui, forge_backend, lambda: build_forge_model(tiny_checkpoint))


def build_forge_sdxl_model(checkpoint: Path):
    """Forge's SDXL engine (backend.diffusion_engine.sdxl.StableDiffusionXL) with the tiny-sdxl
    file's weights, built as Forge's loader builds it: the U-Net (sgm's tree) and both text
    encoders (transformers' CLIPTextModel in IntegratedCLIP, with a text_projection Linear)
    constructed under `using_forge_operations`, then the weights loaded. The file's OpenCLIP
    bigG weights are put in transformers' layout as Forge's loader does (here by diffusers'
    conversion, through the standalone loader)."""
    from backend.diffusion_engine.sdxl import StableDiffusionXL
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.unet import IntegratedUNet2DConditionModel, Timestep
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.operations import using_forge_operations
    from transformers import CLIPTextModel

    from lib_lora.training.family import SDXL
    from lib_lora.training.models import read_state_dict
    from lib_lora.training.models_sdxl import sdxl_modules_from_state_dict
    from lib_lora.training.tiny_model import TINY_SDXL_TIME_DIM, sdxl_configs
    from lib_lora.training.tokenizer import load_clip_tokenizer, load_clip_tokenizer_2

    sd = read_state_dict(checkpoint)
    _, _, te1_cfg, te2_cfg = sdxl_configs()

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    cpu = torch.device("cpu")
    with using_forge_operations(device=cpu, dtype=torch.float32):
        unet = IntegratedUNet2DConditionModel(**fake_sgm.TINY_SGM_UNET_KWARGS)
        clip_l = IntegratedCLIP(CLIPTextModel, te1_cfg, add_text_projection=True)
        clip_g = IntegratedCLIP(CLIPTextModel, te2_cfg, add_text_projection=True)
    unet.load_state_dict(part("model.diffusion_model."))
    unet.storage_dtype = unet.computation_dtype = torch.float32
    unet.load_device = unet.offload_device = unet.initial_device = cpu
    allowed = ("position_ids", "logit_scale")
    te1 = {f"transformer.{k}": v for k, v in part("conditioner.embedders.0.transformer.").items()
           if not k.endswith("position_ids")}
    missing, unexpected = clip_l.load_state_dict(te1, strict=False)
    assert not unexpected and all(k.endswith((*allowed, "text_projection.weight")) for k in missing)
    te2 = {f"transformer.{k}": v for k, v in sdxl_modules_from_state_dict(sd, "tiny-sdxl")[3].state_dict().items()
           if not k.endswith("position_ids")}  # a saved buffer in one transformers version, not in another
    missing, unexpected = clip_g.load_state_dict(te2, strict=False)
    assert not unexpected and all(k.endswith(allowed) for k in missing)
    ldm_vae = AutoencoderKLShape(TINY_LDM_VAE_KWARGS)
    ldm_vae.load_state_dict(part("first_stage_model."))
    vae = IntegratedAutoencoderKL(ldm_vae, scaling_factor=SDXL.latent_scale)
    model = StableDiffusionXL(None, {"unet": unet, "text_encoder": clip_l, "text_encoder_2": clip_g, "vae": vae,
                                     "tokenizer": load_clip_tokenizer(), "tokenizer_2": load_clip_tokenizer_2(),
                                     "scheduler": None})
    # Forge's Timestep(256) is SDXL base's width; the tiny U-Net's adm_in_channels take 16 per value
    model.embedder = Timestep(TINY_SDXL_TIME_DIM)
    for m in (unet, clip_l, clip_g, vae):
        m.eval()
        for p in m.parameters():
            p.requires_grad_(True)  # Forge never freezes them; the host must
    return model


@pytest.fixture
def forge_xl(webui, forge_backend, tiny_sdxl_checkpoint):
    """The fake WebUI as Forge with its SDXL engine loaded (the tiny-sdxl checkpoint)."""
    yield from _as_forge(webui, forge_backend, lambda: build_forge_sdxl_model(tiny_sdxl_checkpoint))
