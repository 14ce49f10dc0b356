"""The diffusers -> compvis/sgm single-file writer, read back through diffusers' own converters
(what `models.py` loads single files with), and the tiny checkpoints built with it."""


import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from open_clip_reference import OpenClipTransformer
from torch import nn

from lib_lora.training import checkpoint_layout as layout
from lib_lora.training.tiny_model import (
    TINY_VERSION,
    build_sd15_modules,
    build_sdxl_modules,
    build_tiny_state_dict,
    ensure_tiny_checkpoint,
    random_state_dict,
)


def _assert_same(ours: dict, back: dict, what: str, values: bool = True) -> None:
    assert set(ours) == set(back), f"{what}: {sorted(set(ours) ^ set(back))[:6]}"
    for k, v in ours.items():
        assert back[k].shape == v.shape, (what, k, back[k].shape, v.shape)
        if values:
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), (what, k)


def _parts(modules, seed=5):
    names = ("unet", "vae", "te1", "te2")
    return [random_state_dict(m, seed, n) for m, n in zip(modules, names, strict=False)]


@pytest.mark.parametrize("full_size", [False, True])
def test_sd15_unet_and_vae_come_back_through_diffusers_converters(full_size):
    unet, vae, te = build_sd15_modules(full_size)  # full size: meta tensors, keys and shapes only
    if full_size:
        u, v, t = unet.state_dict(), vae.state_dict(), te.state_dict()
    else:
        u, v, t = _parts((unet, vae, te))
    sd = layout.sd15_single_file(u, unet.config, v, t)
    assert all(k.startswith(tuple(layout.SD15_PREFIXES.values())) for k in sd)
    _assert_same(u, convert_ldm_unet_checkpoint(sd, dict(unet.config)), "unet", values=not full_size)
    _assert_same(v, convert_ldm_vae_checkpoint(sd, dict(vae.config)), "vae", values=not full_size)
    # the VAE's attention projections are stored as 1x1 convs, as compvis files have them
    q = sd["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q.ndim == 4 and q.shape[2:] == (1, 1)
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in sd  # level 0's down-sampler
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in sd  # up level 0: no attention
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in sd  # after the attention


@pytest.mark.parametrize("full_size", [False, True])
def test_sdxl_parts_come_back_through_diffusers_converters(full_size):
    unet, vae, te1, te2 = build_sdxl_modules(full_size)
    if full_size:
        u, v, t1, t2 = (m.state_dict() for m in (unet, vae, te1, te2))
        t2 = {k: x for k, x in t2.items() if not k.endswith("position_ids")}
    else:
        u, v, t1, t2 = _parts((unet, vae, te1, te2))
    sd = layout.sdxl_single_file(u, unet.config, v, t1, t2)
    _assert_same(u, convert_ldm_unet_checkpoint(sd, dict(unet.config)), "unet", values=not full_size)
    _assert_same(v, convert_ldm_vae_checkpoint(sd, dict(vae.config)), "vae", values=not full_size)
    back = convert_open_clip_checkpoint(te2, sd, prefix=layout.SDXL_PREFIXES["te2"])
    _assert_same(t2, back, "te2", values=not full_size)
    assert infer_diffusers_model_type(sd) == "xl_base"
    unet_keys = {k[len("model.diffusion_model."):] for k in sd if k.startswith("model.diffusion_model.")}
    assert {"label_emb.0.0.weight", "label_emb.0.2.bias"} <= unet_keys  # the text_time embedding
    assert not any(k.startswith(("input_blocks.1.1.", "input_blocks.2.1.")) for k in unet_keys)  # level 0: no attention
    assert "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight" in unet_keys  # depth 2 at level 1
    assert "input_blocks.4.1.proj_in.weight" in unet_keys and sd["model.diffusion_model.input_blocks.4.1.proj_in.weight"].ndim == 2
    assert "output_blocks.2.2.conv.weight" in unet_keys and "output_blocks.5.2.conv.weight" in unet_keys
    assert not any(k.startswith("output_blocks.8.1") for k in unet_keys)  # last up level: no attention, no sampler
    te2_keys = {k[len(layout.SDXL_PREFIXES["te2"]):] for k in sd if k.startswith(layout.SDXL_PREFIXES["te2"])}
    hidden = te2.config.hidden_size
    assert sd[layout.SDXL_PREFIXES["te2"] + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * hidden, hidden)
    assert sd[layout.SDXL_PREFIXES["te2"] + "text_projection"].shape == (hidden, te2.config.projection_dim)
    assert {"positional_embedding", "token_embedding.weight", "ln_final.weight", "logit_scale"} <= te2_keys
    assert any(k.startswith(layout.SDXL_PREFIXES["te1"] + "text_model.encoder.layers.11.") for k in sd)


class _OpenClipText(nn.Module):
    """open_clip's CLIP without its vision tower (what sgm's FrozenOpenCLIPEmbedder2 holds),
    module for module, when open_clip itself cannot be imported (it needs torchvision)."""

    def __init__(self, cfg):
        super().__init__()
        w, n = cfg.hidden_size, cfg.max_position_embeddings
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(n, w))
        self.transformer = OpenClipTransformer(w, cfg.num_hidden_layers, cfg.num_attention_heads)
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(torch.empty(w, cfg.projection_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.register_buffer("attn_mask", torch.full((n, n), float("-inf")).triu_(1), persistent=False)


def _open_clip_text(cfg):
    try:
        import open_clip
    except ImportError:
        return _OpenClipText(cfg)
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    text = CLIPTextCfg(context_length=cfg.max_position_embeddings, vocab_size=cfg.vocab_size, width=cfg.hidden_size,
                       heads=cfg.num_attention_heads, layers=cfg.num_hidden_layers)
    model = open_clip.model.CLIP(cfg.projection_dim, CLIPVisionCfg(layers=1, width=64, image_size=32, patch_size=16), text)
    del model.visual  # as sgm's FrozenOpenCLIPEmbedder2 does
    return model


def test_sdxl_second_encoder_in_open_clip_layout_computes_what_transformers_does(float32_rounding):
    """The OpenCLIP keys load strictly into OpenCLIP's module tree and give the same
    penultimate hidden states (SDXL's context) and pooled projection as the transformers model."""
    _, _, _, hf = build_sdxl_modules(False, device="cpu")
    t2 = random_state_dict(hf, 3, "te2")
    hf.load_state_dict(t2, strict=False)
    oc = _open_clip_text(hf.config)
    oc.load_state_dict(layout.clip_to_open_clip(t2), strict=True)
    hf.eval(), oc.eval()

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49406, (2, 77), generator=gen)
    ids[0, 9:], ids[1, 30:] = 49407, 49407  # end token (the highest id): pooled at its first position
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        x = (oc.token_embedding(ids) + oc.positional_embedding).permute(1, 0, 2)  # sequence first
        for block in oc.transformer.resblocks[:-1]:  # sgm's "penultimate" layer
            x = block(x, attn_mask=oc.attn_mask)
        penultimate = x.permute(1, 0, 2)
        x = oc.transformer.resblocks[-1](x, attn_mask=oc.attn_mask).permute(1, 0, 2)
        pooled = oc.ln_final(x)[torch.arange(2), ids.argmax(-1)] @ oc.text_projection
    tol = float32_rounding(hf)  # q, k, v fused into one matmul sums in another order
    for ours, theirs in ((out.text_embeds, pooled), (out.hidden_states[-2], penultimate)):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= tol * theirs.abs().max()


def test_a_weight_the_layout_does_not_know_is_refused():
    unet, vae, _ = build_sd15_modules(False)
    with pytest.raises(ValueError, match="extra_proj"):
        layout.unet_to_compvis({"extra_proj.weight": torch.zeros(1)}, unet.config)
    with pytest.raises(ValueError, match="down_blocks.0.resnets.0.norm3"):
        layout.unet_to_compvis({"down_blocks.0.resnets.0.norm3.weight": torch.zeros(1)}, unet.config)
    with pytest.raises(ValueError, match="encoder.extra"):
        layout.vae_to_compvis({"encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="q, k and v"):
        layout.clip_to_open_clip({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)})


def test_tiny_weights_depend_on_the_seed_and_names_only(monkeypatch):
    a = build_tiny_state_dict(seed=11)
    torch.manual_seed(999)  # a class that draws its init from the global generator changes nothing
    b = build_tiny_state_dict(seed=11)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = build_tiny_state_dict(seed=12)
    w = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert not torch.equal(a[w], c[w])
    # every matrix is drawn (ldm and diffusers zero-initialise output layers; a tiny model needs signal)
    assert all(v.abs().sum() > 0 for k, v in a.items() if v.ndim >= 2)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_ensure_tiny_checkpoint_names_family_and_version_and_writes_once(tmp_path, family):
    from safetensors import safe_open

    path = ensure_tiny_checkpoint(tmp_path, family=family)
    assert path.name == f"tiny_{family}_v{TINY_VERSION}.safetensors"
    mtime = path.stat().st_mtime_ns
    assert ensure_tiny_checkpoint(tmp_path, family=family) == path and path.stat().st_mtime_ns == mtime
    assert ensure_tiny_checkpoint(tmp_path / "again", family=family).read_bytes() == path.read_bytes()
    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
        assert fh.metadata() == {"fastlora_tiny": f"{family} v{TINY_VERSION}"}
    te = "cond_stage_model.transformer." if family == "sd15" else "conditioner.embedders.0.transformer."
    assert any(k.startswith(te + "text_model.") for k in keys)
    assert (family == "sdxl") == any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in keys)
    with pytest.raises(ValueError, match="unknown model family"):
        ensure_tiny_checkpoint(tmp_path, family="sd3")
