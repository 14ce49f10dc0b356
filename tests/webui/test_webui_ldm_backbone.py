"""The in-place ldm Backbone against the standalone DiffusersBackbone, same weights."""

from __future__ import annotations

import pytest
import torch

from lib_lora.hosts.ldm_backbone import LdmBackbone, preserve_model_state
from lib_lora.training.models import load_backbone


@pytest.fixture(scope="module")
def diffusers_backbone():
    return load_backbone("tiny")


def test_lora_targets_match_the_standalone_names(webui_model, diffusers_backbone):
    ldm = LdmBackbone(webui_model).lora_targets()
    ref = diffusers_backbone.lora_targets()
    names = [t.name for t in ldm]
    assert len([n for n in names if n.startswith("lora_unet_")]) == 192
    assert len([n for n in names if n.startswith("lora_te_")]) == 72
    assert sorted(names) == sorted(t.name for t in ref)
    # the same module shapes under the same names
    ref_by = {t.name: t.module for t in ref}
    for t in ldm:
        assert t.module.weight.shape == ref_by[t.name].weight.shape, t.name
    conv = LdmBackbone(webui_model).lora_targets(conv=True)
    ref_conv = diffusers_backbone.lora_targets(conv=True)
    assert sorted(t.name for t in conv) == sorted(t.name for t in ref_conv)


def test_the_ldm_backbone_reads_prefixes_and_chunks_from_its_family(webui_model):
    from lib_lora.training.family import SD15, TextEncoderSpec

    bb = LdmBackbone(webui_model)
    assert bb.family is SD15
    names = [t.name for t in bb.lora_targets()]
    bb.family = SD15.replace(unet_prefix="lora_x", text_encoders=(TextEncoderSpec("lora_te9", 64),),
                             chunk_length=10)  # fmt: skip
    assert [t.name for t in bb.lora_targets()] == [
        n.replace("lora_unet_", "lora_x_").replace("lora_te_", "lora_te9_") for n in names]
    ids = torch.randint(3, 50, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        halves = torch.cat([bb.text_encoder(ids[:, :10]).last_hidden_state,
                            bb.text_encoder(ids[:, 10:]).last_hidden_state], dim=1)  # fmt: skip
        assert torch.equal(bb.encode_text(ids), halves)


def test_text_encoding_matches_and_bypasses_the_emphasis_parser(webui_model, diffusers_backbone):
    bb = LdmBackbone(webui_model)
    tok = bb.tokenizer
    ids = tok(["a (photo:1.3) of sks", "1girl, smile"], padding="max_length", max_length=77,
              truncation=True, return_tensors="pt").input_ids
    ids = torch.cat([ids, ids.flip(0)], dim=1)  # two 77-token chunks
    for skip in (1, 2):
        ours = bb.encode_text(ids, clip_skip=skip)
        ref = diffusers_backbone.encode_text(ids, clip_skip=skip)
        assert ours.shape == (2, 154, 64)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_noise_prediction_and_latents_match(webui_model, diffusers_backbone):
    bb = LdmBackbone(webui_model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    cond = torch.randn(2, 77, 64, generator=gen)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(bb.predict_noise(x, t, cond), diffusers_backbone.predict_noise(x, t, cond),
                                   rtol=1e-4, atol=1e-5)
    pixels = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    torch.manual_seed(5)
    ours = bb.encode_images(pixels)
    torch.manual_seed(5)
    ref = diffusers_backbone.encode_images(pixels)
    assert ours.shape == (1, 4, 8, 8) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_preserve_model_state_freezes_then_gives_everything_back(webui_model):
    from lib_lora.training.lora import LoRANetwork

    bb = LdmBackbone(webui_model)
    unet = webui_model.model.diffusion_model
    block = next(m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
    block.checkpoint = True  # an ldm config with use_checkpoint: its reentrant checkpoint drops LoRA grads
    flags = {n: p.requires_grad for n, p in webui_model.named_parameters()}
    assert all(flags.values())
    with pytest.raises(RuntimeError, match="boom"):
        with preserve_model_state(webui_model):
            assert not any(p.requires_grad for p in webui_model.parameters())
            assert block.checkpoint is False
            net = LoRANetwork(bb.lora_targets(), dim=4, alpha=2).apply()
            handle = unet.register_forward_hook(lambda *a: None)
            unet.add_module("stray", torch.nn.Linear(1, 1))
            out = bb.predict_noise(torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 77, 64))
            out.float().mean().backward()
            assert all(p.grad is not None for p in net.unet_parameters())  # gradients reach the LoRA
            del handle
            raise RuntimeError("boom")  # the loop dies with the network still applied
    assert {n: p.requires_grad for n, p in webui_model.named_parameters()} == flags
    assert block.checkpoint is True
    assert not unet._forward_hooks and not hasattr(unet, "stray")
    assert all("forward" not in m.__dict__ for m in webui_model.modules())
    assert all(p.grad is None for p in webui_model.parameters())


def test_gradient_checkpointing_gives_the_same_lora_gradients_and_is_given_back(webui_model):
    """Checkpointing the ldm U-Net's blocks (torch's non-reentrant checkpoint) recomputes them in
    the backward pass, reaches the LoRA weights with the same gradients, and leaves nothing behind."""
    from lib_lora.training import speed
    from lib_lora.training.lora import LoRANetwork

    bb = LdmBackbone(webui_model)
    unet = webui_model.model.diffusion_model
    gen = torch.Generator().manual_seed(1)
    x, t, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([20, 700]), torch.randn(2, 77, 64, generator=gen)
    calls = []  # calls of a layer inside a block (the block's own recompute bypasses its hooks)
    hook = unet.input_blocks[1][0].register_forward_pre_hook(lambda *a: calls.append(1))

    def lora_grads(checkpointing: bool) -> tuple[list[torch.Tensor], int]:
        with preserve_model_state(webui_model):
            if checkpointing:
                assert speed.enable_gradient_checkpointing(bb, text_encoder_too=True)
            torch.manual_seed(0)
            net = LoRANetwork(bb.lora_targets(), dim=4, alpha=2).apply()
            for p in net.unet_parameters():  # a non-zero LoRA, so every weight gets a gradient
                torch.nn.init.normal_(p, std=0.05)
            calls.clear()
            bb.predict_noise(x, t, cond).float().pow(2).mean().backward()
            grads = [p.grad.clone() for p in net.unet_parameters()]
            net.remove()
        return grads, len(calls)

    plain, plain_calls = lora_grads(False)
    ckpt, ckpt_calls = lora_grads(True)
    hook.remove()
    assert plain_calls == 1 and ckpt_calls == 2  # the block ran again in the backward pass
    # All but the self-attention q/k of the 1x1 deepest level (one token: softmax is constant).
    assert len(plain) == len(ckpt) and sum(bool(g.abs().sum() > 0) for g in ckpt) >= len(ckpt) - 4
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all("forward" not in m.__dict__ for m in webui_model.modules())
    te = bb.text_encoder
    assert not any(getattr(m, "gradient_checkpointing", False) for m in te.modules())
