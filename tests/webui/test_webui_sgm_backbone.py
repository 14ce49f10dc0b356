"""The in-place sgm (SDXL) Backbone on the stand-in sgm model, against the standalone
SDXLBackbone loaded from the same tiny-sdxl file."""

from __future__ import annotations

import pytest
import torch

from lib_lora.hosts.sgm_backbone import SgmBackbone, preserve_model_state
from lib_lora.training.backbone_sdxl import added_conditions, bucket_time_ids


@pytest.fixture(scope="module")
def sdxl_backbone():
    from lib_lora.training.models_sdxl import load_backbone

    return load_backbone("tiny-sdxl")


def _ids(tokenizer, texts):
    return tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_lora_targets_are_kohyas_sdxl_names_without_text_encoder_2(sgm_model, sdxl_backbone):
    ours = SgmBackbone(sgm_model).lora_targets()
    ref = [t for t in sdxl_backbone.lora_targets() if not t.name.startswith("lora_te2_")]
    # the standalone backbone's order too: LoRA weights are initialised in target order
    assert [t.name for t in ours] == [t.name for t in ref]
    ref_by = {t.name: t.module for t in ref}
    for t in ours:
        assert t.module.weight.shape == ref_by[t.name].weight.shape, t.name
    names = [t.name for t in ours]
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    conv = SgmBackbone(sgm_model).lora_targets(conv=True)
    assert [t.name for t in conv] == [
        t.name for t in sdxl_backbone.lora_targets(conv=True) if not t.name.startswith("lora_te2_")]


def test_text_conditioning_is_sgms_and_matches_the_standalone_backbone(sgm_model, sdxl_backbone):
    bb = SgmBackbone(sgm_model)
    ids = _ids(bb.tokenizer, ["a (photo:1.3) of sks", "1girl, smile"])
    ids = torch.cat([ids, ids.flip(0)], dim=1)  # two 77-token chunks
    with torch.no_grad():
        ours = bb.encode_text(ids)
        ref = sdxl_backbone.encode_text(ids)
    assert ours.cond.shape == (2, 154, 64 + 128) and ours.pooled.shape == (2, 128)
    # float32 through two implementations of the same layers (fused vs split projections)
    torch.testing.assert_close(ours.cond, ref.cond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.pooled, ref.pooled, rtol=1e-4, atol=1e-5)
    # TE1 is its hidden state 11 (the penultimate) exactly, chunk by chunk
    with torch.no_grad():
        h1 = bb.text_encoder(ids[:, 77:], output_hidden_states=True).hidden_states[11]
    assert torch.equal(ours.cond[:, 77:, :64], h1)


def test_noise_prediction_matches_the_standalone_backbone(sgm_model, sdxl_backbone):
    bb = SgmBackbone(sgm_model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    cond = torch.randn(2, 77, 192, generator=gen)
    pooled = torch.randn(2, 128, generator=gen)
    ids = bucket_time_ids([(640, 480), (512, 512)], (512, 384), flipped=[True, False])
    added = added_conditions(pooled, ids)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        ours = bb.predict_noise(x, t, cond, added)
        ref = sdxl_backbone.predict_noise(x, t, cond, added)
        other = bb.predict_noise(x, t, cond, added_conditions(pooled, ids.flip(0)))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, other)  # the time ids reach the U-Net
    with pytest.raises(ValueError, match="added conditioning"):
        bb.predict_noise(x, t, cond)


def test_latents_use_the_sdxl_scale(sgm_model, sdxl_backbone):
    bb = SgmBackbone(sgm_model)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    torch.manual_seed(5)
    ours = bb.encode_images(pixels)
    torch.manual_seed(5)
    ref = sdxl_backbone.encode_images(pixels)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def _step(bb, net, gen):
    opt = torch.optim.AdamW(list(net.parameters()), lr=1e-2)
    tok = bb.tokenizer
    ids = _ids(tok, ["sks person"])
    text = bb.encode_text(ids)
    added = added_conditions(text.pooled, bucket_time_ids([(512, 512)], (512, 512)))
    x = torch.randn(1, 4, 16, 16, generator=gen)
    noise = torch.randn_like(x)
    loss = (bb.predict_noise(x + noise, torch.tensor([400]), text.cond, added) - noise).pow(2).mean()
    loss.backward()
    opt.step()
    return loss


def test_a_training_step_changes_only_the_lora_and_the_host_comes_back_bit_identical(sgm_model, state_hash, grad_flags):
    from lib_lora.training.lora import LoRANetwork

    bb = SgmBackbone(sgm_model)
    before, flags = state_hash(sgm_model), grad_flags(sgm_model)
    with preserve_model_state(sgm_model):
        assert not any(p.requires_grad for p in sgm_model.parameters())
        net = LoRANetwork(bb.lora_targets(), dim=4, alpha=2).apply()
        first = {k: v.clone() for k, v in net.state_dict().items()}
        _step(bb, net, torch.Generator().manual_seed(3))
        assert all(p.grad is not None for p in net.unet_parameters())
        # TE1's LoRA is trained too, but for its last layer, whose output SDXL does not use
        te1 = {name: lora for name, lora in net.loras.items() if name.startswith("lora_te1_")}
        assert te1 and all((name.startswith("lora_te1_text_model_encoder_layers_11_")
                            == all(p.grad is None for p in lora.parameters())) for name, lora in te1.items())
        assert any(not torch.equal(first[k], v) for k, v in net.state_dict().items())
        net.remove()
    assert state_hash(sgm_model) == before and grad_flags(sgm_model) == flags
    assert all(p.grad is None for p in sgm_model.parameters())
    assert all("forward" not in m.__dict__ for m in sgm_model.modules())


@pytest.mark.parametrize("stop", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_exception_or_interrupt_mid_step_gives_the_model_back(sgm_model, state_hash, grad_flags, stop):
    from lib_lora.training import speed
    from lib_lora.training.lora import LoRANetwork

    bb = SgmBackbone(sgm_model)
    before, flags = state_hash(sgm_model), grad_flags(sgm_model)
    with pytest.raises(type(stop)):
        with preserve_model_state(sgm_model):
            assert speed.enable_gradient_checkpointing(bb, text_encoder_too=True)
            net = LoRANetwork(bb.lora_targets(), dim=4, alpha=2).apply()
            _step(bb, net, torch.Generator().manual_seed(4))
            raise stop  # the network still applied
    assert state_hash(sgm_model) == before and grad_flags(sgm_model) == flags
    assert all("forward" not in m.__dict__ for m in sgm_model.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in bb.text_encoder.modules())
    assert all(p.grad is None for p in sgm_model.parameters())


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr", "dora"])
def test_lycoris_types_train_in_place_and_give_the_model_back(kind, sgm_model, sdxl_backbone, state_hash, grad_flags):
    """Each LyCORIS type on the WebUI's loaded SDXL, under the standalone backbone's kohya names."""
    pytest.importorskip("lycoris")
    from lib_lora.training.lycoris_net import LycorisKohyaNetwork

    bb = SgmBackbone(sgm_model)
    before, flags = state_hash(sgm_model), grad_flags(sgm_model)
    targets = bb.lora_targets(conv=True)
    ref = [t.name for t in sdxl_backbone.lora_targets(conv=True) if not t.name.startswith("lora_te2_")]
    with preserve_model_state(sgm_model):
        torch.manual_seed(0)
        net = LycorisKohyaNetwork(targets, kind, dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0).apply()
        assert sorted(net.names()) == sorted(ref)
        first = {k: v.clone() for k, v in net.state_dict().items()}
        _step(bb, net, torch.Generator().manual_seed(3))
        assert any(not torch.equal(first[k], v) for k, v in net.state_dict().items() if k.startswith("lora_unet_"))
        net.remove()
    assert state_hash(sgm_model) == before and grad_flags(sgm_model) == flags
    assert all(p.grad is None for p in sgm_model.parameters())
    for t in targets:
        assert not [k for k in vars(t.module) if k == "forward" or k.startswith("_lycoris")], t.name
