"""kohya names computed from module trees: full-size counts, and ldm == diffusers."""

import torch
from ldm_shapes import TINY_LDM_UNET_KWARGS

from lib_lora.training.lora import LoRANetwork
from lib_lora.training.models import sd15_text_encoder_config, sd15_unet_config
from lib_lora.training.naming import compvis_to_diffusers, text_encoder_targets, unet_targets


def _meta_sd15():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    cfg = {k: v for k, v in sd15_unet_config().items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
        te = CLIPTextModel(sd15_text_encoder_config())
    return unet, te


def test_full_size_sd15_has_192_unet_and_72_text_encoder_targets():
    unet, te = _meta_sd15()
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    u, t = unet_targets(unet), text_encoder_targets(te)
    assert len(u) == 192 and len(t) == 72
    names = {x.name for x in u + t}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_mid_block_attentions_0_proj_out" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in names
    assert not any(x.conv3x3 for x in u)
    # conv LoRA adds the ResNet and sampler convs: 22 ResNets x 3 3x3-or-linear + shortcuts + samplers
    conv = unet_targets(unet, conv=True)
    conv3 = [x for x in conv if x.conv3x3]
    assert len(conv3) == 22 * 2 + 3 + 3  # conv1, conv2 of each ResNet; 3 down- and 3 up-samplers
    assert "lora_unet_up_blocks_3_resnets_2_conv_shortcut" in {x.name for x in conv}


def test_compvis_paths_map_to_diffusers_paths():
    cases = {
        "input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in",
        "input_blocks.2.1.transformer_blocks.0.attn2.to_k": "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
        "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "input_blocks.11.0.emb_layers.1": "down_blocks.3.resnets.1.time_emb_proj",
        "middle_block.1.proj_out": "mid_block.attentions.0.proj_out",
        "middle_block.2.out_layers.3": "mid_block.resnets.1.conv2",
        "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks.5.1.transformer_blocks.0.ff.net.2": "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2",
        "output_blocks.11.1.proj_in": "up_blocks.3.attentions.2.proj_in",
    }
    for compvis, diffusers in cases.items():
        assert compvis_to_diffusers(compvis) == diffusers


def _tiny_ldm_unet(tiny_checkpoint):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import load_file

    sd = load_file(str(tiny_checkpoint))
    prefix = "model.diffusion_model."
    unet = UNetModel(**TINY_LDM_UNET_KWARGS)
    unet.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    return unet.eval().requires_grad_(False)


def test_ldm_and_diffusers_unets_give_same_names_and_same_lora_outputs(tiny_backbone, tiny_checkpoint, randomize):
    ldm_unet = _tiny_ldm_unet(tiny_checkpoint)
    d_unet = tiny_backbone.unet
    for conv in (False, True):
        ldm_names = [t.name for t in unet_targets(ldm_unet, conv)]
        d_names = [t.name for t in unet_targets(d_unet, conv)]
        assert sorted(ldm_names) == sorted(d_names)
        assert len(set(d_names)) == len(d_names)
    assert len(unet_targets(ldm_unet)) == 192

    torch.manual_seed(0)
    net_d = LoRANetwork(unet_targets(d_unet, conv=True), dim=4, alpha=2, conv_dim=2, conv_alpha=1)
    randomize(net_d)
    net_l = LoRANetwork(unet_targets(ldm_unet, conv=True), dim=4, alpha=2, conv_dim=2, conv_alpha=1)
    net_l.load_kohya(net_d.state_dict_kohya())

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([3, 700])
    ctx = torch.randn(2, 77, TINY_LDM_UNET_KWARGS["context_dim"], generator=gen)
    with torch.no_grad():
        base = d_unet(x, t, encoder_hidden_states=ctx).sample
        assert torch.allclose(base, ldm_unet(x, t, context=ctx), rtol=1e-4, atol=1e-4)
        net_d.apply(), net_l.apply()
        try:
            out_d = d_unet(x, t, encoder_hidden_states=ctx).sample
            out_l = ldm_unet(x, t, context=ctx)
        finally:
            net_d.remove(), net_l.remove()
        after = d_unet(x, t, encoder_hidden_states=ctx).sample
    assert (out_d - base).abs().mean() > 1e-3  # the LoRA changes the output...
    assert torch.allclose(out_d, out_l, rtol=1e-4, atol=1e-4)  # ...identically on both trees
    assert torch.equal(after, base)  # and remove() restores the model exactly
