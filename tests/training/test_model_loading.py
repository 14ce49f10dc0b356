"""Loading SD1.5 offline: single file, diffusers folder, tokenizer, and clear refusals."""

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_lora.errors import ModelLoadError
from lib_lora.training.models import check_sd15, load_backbone, read_state_dict
from lib_lora.training.tokenizer import load_clip_tokenizer


def test_tokenizer_is_openai_clip_offline():
    tok = load_clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 49407 and tok.model_max_length == 77


def test_tiny_checkpoint_is_deterministic_and_loads_via_single_file_path(tmp_path, tiny_checkpoint):
    from lib_lora.training.tiny_model import ensure_tiny_checkpoint

    again = ensure_tiny_checkpoint(tmp_path)
    assert again.read_bytes() == tiny_checkpoint.read_bytes()
    sd = load_file(str(tiny_checkpoint))
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in sd)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in sd)


def _tiny_outputs(backbone):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
    ids = backbone.tokenizer(["1girl, red hair"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    cond = backbone.encode_text(ids)
    lat = torch.randn(1, 4, 8, 8, generator=gen)
    return cond, backbone.predict_noise(lat, torch.tensor([500]), cond), backbone.vae.encode(x).latent_dist.mean


def test_diffusers_folder_gives_same_model_as_single_file(tmp_path, tiny_backbone):
    folder = tmp_path / "tiny-diffusers"
    tiny_backbone.unet.save_pretrained(folder / "unet")
    tiny_backbone.vae.save_pretrained(folder / "vae")
    tiny_backbone.text_encoder.save_pretrained(folder / "text_encoder")
    tiny_backbone.tokenizer.save_pretrained(folder / "tokenizer")
    loaded = load_backbone(str(folder))
    with torch.no_grad():
        for a, b in zip(_tiny_outputs(tiny_backbone), _tiny_outputs(loaded), strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_missing_empty_and_truncated_files_get_clear_messages(tmp_path, tiny_checkpoint):
    with pytest.raises(ModelLoadError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        read_state_dict(empty)
    cut = tmp_path / "cut.safetensors"
    data = tiny_checkpoint.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_backbone(str(cut))


class Evil:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_ckpt_only_with_weights_only(tmp_path):
    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": {"x": Evil()}}))
    with pytest.raises(ModelLoadError, match="refused"):
        read_state_dict(bad)
    good = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(2)}}, good)
    assert set(read_state_dict(good)) == {"model.diffusion_model.x"}


@pytest.mark.parametrize(
    "keys,message",
    [
        ({"conditioner.embedders.0.transformer.x": (1,)}, "SDXL"),
        ({"lora_unet_x.lora_down.weight": (1,)}, "is a LoRA"),
        ({"first_stage_model.x": (1,)}, "no Stable Diffusion U-Net"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3), "cond_stage_model.transformer.x": (1,)}, "inpainting"),
        ({"model.diffusion_model.x": (1,), "cond_stage_model.model.x": (1,)}, "SD2"),
        ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}, "SD2"),
    ],
)
def test_other_model_kinds_are_recognised_and_refused(keys, message):
    sd = {k: torch.zeros(shape) for k, shape in keys.items()}
    with pytest.raises(ModelLoadError, match=message):
        check_sd15(sd, "model.safetensors")


def test_sd2_file_refused_end_to_end(tmp_path):
    path = tmp_path / "sd2.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match="SD2"):
        load_backbone(str(path))
