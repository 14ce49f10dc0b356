"""SDXL loading and the SDXL Backbone, against references built independently of the loader.

The single-file checkpoint here is assembled from the original module classes' key layout:
the U-Net from ldm's UNetModel (the module tree sgm's SDXL U-Net shares: SDXL's yaml with
`attention_resolutions [4, 2]`, `use_linear_in_transformer`, `num_head_channels 64`, plus sgm's
`label_emb` for the extra vector), the VAE from ldm's Encoder/Decoder, TE1 a transformers
CLIPTextModel (what sgm's FrozenCLIPEmbedder holds) and TE2 a re-statement of open_clip's text
tower with open_clip's module names and forward (open_clip cannot be imported without
torchvision). Their forwards are the references the converted diffusers modules must match.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from open_clip_reference import OpenClipTransformer
from torch import nn

from lib_lora.errors import ModelLoadError
from lib_lora.training.backbone_sdxl import (
    SDXLBackbone,
    added_conditions,
    bucket_time_ids,
    size_conditioning,
    te2_input_ids,
    time_ids,
)

TE1_W, TE2_W, TE2_EMBED, TE2_LAYERS, TIME_DIM = 64, 128, 96, 4, 16
CONTEXT = TE1_W + TE2_W
ADM = TE2_EMBED + 6 * TIME_DIM
BOS, EOS = 49406, 49407


# --------------------------------------------------------------------------------------------
# The reference modules


class OpenClipText(nn.Module):
    """The text side of open_clip's CLIP, as sgm's FrozenOpenCLIPEmbedder2 holds it in `model`."""

    def __init__(self, vocab=49408, ctx=77, width=TE2_W, layers=TE2_LAYERS, heads=TE2_W // 64, embed=TE2_EMBED):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.empty(ctx, width))
        self.transformer = OpenClipTransformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def forward(self, text):
        """(penultimate hidden state, pooled) as sgm's FrozenOpenCLIPEmbedder2 with
        layer="penultimate", legacy=False, always_return_pooled=True computes them."""
        ctx = text.shape[1]
        mask = torch.empty(ctx, ctx).fill_(float("-inf")).triu_(1)
        x = (self.token_embedding(text) + self.positional_embedding).permute(1, 0, 2)
        blocks = self.transformer.resblocks
        for i, r in enumerate(blocks):
            if i == len(blocks) - 1:
                penultimate = x.permute(1, 0, 2)
            x = r(x, attn_mask=mask)
        last = self.ln_final(x.permute(1, 0, 2))
        pooled = last[torch.arange(last.shape[0]), text.argmax(dim=-1)] @ self.text_projection
        return penultimate, pooled


def _ldm_unet():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(image_size=16, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2],
                     num_res_blocks=2, channel_mult=[1, 2, 2], num_head_channels=64, use_spatial_transformer=True,
                     use_linear_in_transformer=True, transformer_depth=1, context_dim=CONTEXT, use_checkpoint=False,
                     legacy=False)
    # sgm's UNetModel with num_classes="sequential": the extra vector enters through label_emb
    t = 4 * 32
    unet.num_classes = "sequential"
    unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(ADM, t), nn.SiLU(), nn.Linear(t, t)))
    return unet


class LdmVAE(nn.Module):
    def __init__(self):
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        super().__init__()
        dd = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
              "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
        self.encoder, self.decoder = Encoder(**dd), Decoder(**dd)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(8, 8, 1), nn.Conv2d(4, 4, 1)


def _te1():
    from transformers import CLIPTextModel

    from lib_lora.training.models import sd15_text_encoder_config

    cfg = sd15_text_encoder_config()
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.projection_dim = TE1_W, 4 * TE1_W, 1, TE1_W
    return CLIPTextModel(cfg)


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    # ldm zero-initialises output layers; every weight gets a fan-in scaled normal instead,
    # norm scales 1 + noise, biases noise (logit_scale, unused by text encoding, is left)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))
            elif p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + torch.randn(p.shape, generator=gen) * 0.05)


@pytest.fixture(scope="session")
def sgm_reference():
    """(state dict in the sgm single-file layout, the reference modules it came from)."""
    gen = torch.Generator().manual_seed(7)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        parts = {"unet": _ldm_unet(), "vae": LdmVAE(), "te1": _te1(), "te2": OpenClipText()}
    for m in parts.values():
        _randomize(m, gen)
        m.eval()
    prefixes = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                "te1": "conditioner.embedders.0.transformer.", "te2": "conditioner.embedders.1.model."}
    sd = {}
    for key, m in parts.items():
        for k, v in m.state_dict().items():
            sd[prefixes[key] + k] = v.detach().clone().contiguous()
    return sd, parts


@pytest.fixture(scope="session")
def sgm_file(sgm_reference, tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("sgm") / "tiny_sgm_sdxl.safetensors"
    save_file(sgm_reference[0], str(path))
    return path


@pytest.fixture(scope="session")
def xl_single(sgm_file):
    from lib_lora.training.models_sdxl import load_backbone

    return load_backbone(str(sgm_file))


@pytest.fixture(scope="session")
def xl_folder(xl_single, tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl") / "tiny-sdxl-diffusers"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        getattr(xl_single, part).save_pretrained(str(folder / part), safe_serialization=True)
    return folder


def _ids(*captions: list[int], chunks: int = 1) -> torch.Tensor:
    rows = []
    for toks in captions:
        row = []
        for c in range(chunks):
            part = toks[c * 75:(c + 1) * 75]
            chunk = [BOS, *part, EOS]
            row += chunk + [EOS] * (77 - len(chunk))
        rows.append(row)
    return torch.tensor(rows)


# --------------------------------------------------------------------------------------------
# Loading


def test_single_file_loads_as_sdxl_with_the_reference_weights(xl_single, sgm_reference):
    sd, parts = sgm_reference
    assert isinstance(xl_single, SDXLBackbone)
    assert xl_single.vae.config.scaling_factor == 0.13025
    cfg = xl_single.unet.config
    assert list(cfg.block_out_channels) == [32, 64, 64]
    assert cfg.addition_time_embed_dim == TIME_DIM and cfg.projection_class_embeddings_input_dim == ADM
    assert cfg.cross_attention_dim == CONTEXT
    # TE2's projection is open_clip's matrix transposed; its q/k/v are the fused in_proj's thirds
    te2 = xl_single.text_encoder_2
    torch.testing.assert_close(te2.text_projection.weight, parts["te2"].text_projection.T, rtol=0, atol=0)
    q = te2.text_model.encoder.layers[1].self_attn.q_proj.weight
    torch.testing.assert_close(q, parts["te2"].transformer.resblocks[1].attn.in_proj_weight[:TE2_W], rtol=0, atol=0)
    n_params = sum(p.numel() for m in (xl_single.unet, xl_single.vae, xl_single.text_encoder, te2) for p in m.parameters())
    n_ref = sum(v.numel() for k, v in sd.items() if not k.endswith(("position_ids", "logit_scale")))
    assert n_params == n_ref  # every weight of the file is used, none is invented


def test_diffusers_folder_loads_the_same_modules_and_tensors(xl_single, xl_folder):
    from lib_lora.training.models_sdxl import load_backbone

    folder = load_backbone(str(xl_folder))
    assert isinstance(folder, SDXLBackbone)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(xl_single, part), getattr(folder, part)
        assert type(a) is type(b)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), part
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{part}.{k}"
    assert folder.tokenizer_2.pad_token_id == 0 and xl_single.tokenizer_2.pad_token_id == 0
    assert folder.tokenizer.pad_token_id == EOS


def _write(path, tensors):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_refiner_inpainting_sd2_and_sd15_files_are_refused_with_one_sentence(sgm_reference, tmp_path):
    from lib_lora.training.models_sdxl import load_backbone, load_sdxl_backbone

    sd = sgm_reference[0]
    refiner = {k.replace("conditioner.embedders.1.model.", "conditioner.embedders.0.model."): v for k, v in sd.items()
               if not k.startswith("conditioner.embedders.0.")}
    inpaint = dict(sd)
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(w.shape[0], 9, *w.shape[2:])
    sd2 = {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3, 1),
           "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    cases = {"refiner": (refiner, "refiner"), "inpaint": (inpaint, "inpainting"), "sd2": (sd2, "SD2")}
    for i, (tensors, word) in enumerate(cases.values()):
        path = _write(tmp_path / f"model_{i}.safetensors", tensors)  # a name that says nothing
        for load in (load_backbone, load_sdxl_backbone):
            with pytest.raises(ModelLoadError) as err:
                load(str(path))
            msg = str(err.value)
            assert word in msg and path.name in msg and "\n" not in msg
    sd15 = _write(tmp_path / "sd15.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                                                   "cond_stage_model.transformer.text_model.x": torch.zeros(1)})
    with pytest.raises(ModelLoadError, match="not an SDXL model"):
        load_sdxl_backbone(str(sd15))


def test_refiner_inpainting_and_sd2_folders_are_refused(tmp_path):
    from lib_lora.training.models_sdxl import load_backbone

    def folder(name, unet_cfg, parts):
        f = tmp_path / f"model_{len(list(tmp_path.iterdir()))}"  # a name that says nothing
        (f / "unet").mkdir(parents=True)
        (f / "unet" / "config.json").write_text(json.dumps(unet_cfg))
        for p in parts:
            (f / p).mkdir()
        return f

    xl = {"addition_embed_type": "text_time", "cross_attention_dim": 2048, "in_channels": 4}
    cases = {
        "refiner": (folder("refiner", {**xl, "cross_attention_dim": 1280, "projection_class_embeddings_input_dim": 2560},
                           ["text_encoder_2", "vae"]), "refiner"),
        "inpaint": (folder("inpaint", {**xl, "in_channels": 9}, ["text_encoder", "text_encoder_2", "vae"]), "inpainting"),
        "sd2": (folder("sd2", {"cross_attention_dim": 1024, "in_channels": 4}, ["text_encoder", "vae"]), "SD2"),
    }
    for f, word in cases.values():
        with pytest.raises(ModelLoadError) as err:
            load_backbone(str(f))
        msg = str(err.value)
        assert f.name in msg and "\n" not in msg
        assert word in msg.replace(str(f), "").replace(f.name, "")  # not found in the test's own path


def test_an_sd15_checkpoint_still_goes_to_the_sd15_loader(tiny_checkpoint):
    from lib_lora.training.backbone import DiffusersBackbone
    from lib_lora.training.models_sdxl import load_backbone, model_family

    assert model_family(str(tiny_checkpoint)) == "sd15"
    bb = load_backbone(str(tiny_checkpoint))
    assert type(bb) is DiffusersBackbone


# --------------------------------------------------------------------------------------------
# Text encoding


def test_encode_text_matches_the_sgm_embedders_chunk_by_chunk(xl_single, sgm_reference):
    parts = sgm_reference[1]
    short, long = [320, 1125, 539], list(range(400, 400 + 100))
    ids = _ids(short, long, chunks=2)
    ids2 = te2_input_ids(ids, EOS, 0)
    # the second tokenizer's padding: "!" (0) after the end-of-text of each chunk
    assert ids2[0, :5].tolist() == [BOS, 320, 1125, 539, EOS] and ids2[0, 5:77].eq(0).all()
    assert ids2[0, 77:79].tolist() == [BOS, EOS] and ids2[0, 79:].eq(0).all()
    assert torch.equal(ids2[1, :77], ids[1, :77])  # a full chunk has no padding
    with torch.no_grad():
        tc = xl_single.encode_text(ids)
        assert tc.cond.shape == (2, 154, CONTEXT) and tc.pooled.shape == (2, TE2_EMBED)
        for c in range(2):
            part1, part2 = ids[:, 77 * c:77 * (c + 1)], ids2[:, 77 * c:77 * (c + 1)]
            h1 = parts["te1"](part1, output_hidden_states=True).hidden_states[11]  # sgm FrozenCLIPEmbedder layer_idx 11
            h2, pooled = parts["te2"](part2)
            got = tc.cond[:, 77 * c:77 * (c + 1)]
            scale = 1e-5 * max(h1.abs().max().item(), h2.abs().max().item())  # fp32, a few dozen layers of sums
            torch.testing.assert_close(got[..., :TE1_W], h1, rtol=1e-4, atol=scale)
            torch.testing.assert_close(got[..., TE1_W:], h2, rtol=1e-4, atol=scale)
            if c == 0:  # the pooled output is the first chunk's
                torch.testing.assert_close(tc.pooled, pooled, rtol=1e-4, atol=1e-5 * pooled.abs().max().item())
        # derived TE2 ids give what explicit ones give
        explicit = xl_single.encode_text(ids, input_ids_2=ids2)
    assert torch.equal(explicit.cond, tc.cond) and torch.equal(explicit.pooled, tc.pooled)


def test_te2_ids_equal_the_second_tokenizers_own(xl_single):
    from lib_lora.training.data import CaptionTokens

    captions = ["a photo of sks person, smiling", "red hair " * 90, ""]
    t1, t2 = CaptionTokens(xl_single.tokenizer).batch(captions), CaptionTokens(xl_single.tokenizer_2).batch(captions)
    assert t2.shape == t1.shape and t1.shape[1] == 3 * 77
    assert torch.equal(te2_input_ids(t1, EOS, xl_single.tokenizer_2.pad_token_id), t2)
    assert not torch.equal(t1, t2)


# --------------------------------------------------------------------------------------------
# Size and crop conditioning


def test_time_ids_follow_kohyas_bucket_rule():
    # square image, square bucket: nothing cropped
    assert size_conditioning((1024, 1024), (1024, 1024)) == ((1024, 1024), (0, 0), (1024, 1024))
    # 1200x800 (ar 1.5) in the 1216x832 bucket (ar 1.4615): kohya fits the width, 1216 x 810.67,
    # and centres it: top = (832 - 810.67) // 2 = 10
    assert size_conditioning((1200, 800), (1216, 832)) == ((800, 1200), (10, 0), (832, 1216))
    # 601x1000 (ar 0.601) in 832x1216 (ar 0.684): height fits, width 1216 * 0.601 = 730.816,
    # left = (832 - 730.816) // 2 = 50; flipped: 832 - (50 + 730.816) = 51.18 -> 51
    assert size_conditioning((601, 1000), (832, 1216)) == ((1000, 601), (0, 50), (1216, 832))
    assert size_conditioning((601, 1000), (832, 1216), flipped=True) == ((1000, 601), (0, 51), (1216, 832))
    ids = bucket_time_ids([(1200, 800), (1216, 832)], (1216, 832), flipped=[False, True])
    assert ids.tolist() == [[800, 1200, 10, 0, 832, 1216], [832, 1216, 0, 0, 832, 1216]]
    assert time_ids((1, 2), (3, 4), (5, 6)).tolist() == [1, 2, 3, 4, 5, 6]


def test_forward_with_added_conditioning_matches_the_sgm_unet(xl_single, sgm_reference):
    """diffusers' text_time embedding of (pooled, time ids) equals sgm's vector conditioner
    (pooled ++ timestep_embedding of each size pair, 256 -> here TIME_DIM per number)."""
    from ldm.modules.diffusionmodules.util import timestep_embedding

    unet_ref = sgm_reference[1]["unet"]
    gen = torch.Generator().manual_seed(3)
    lat = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    cond = torch.randn(2, 77, CONTEXT, generator=gen)
    pooled = torch.randn(2, TE2_EMBED, generator=gen)
    ids = bucket_time_ids([(100, 80), (64, 64)], (64, 64))
    sizes = [ids[:, 0:2], ids[:, 2:4], ids[:, 4:6]]  # sgm: original_size_as_tuple, crop_coords_top_left, target_size
    vec = torch.cat([pooled] + [timestep_embedding(s.flatten(), TIME_DIM).reshape(2, -1) for s in sizes], dim=1)
    with torch.no_grad():
        ref = unet_ref(lat, t, context=cond, y=vec)
        got = xl_single.predict_noise(lat, t, cond, added_conditions(pooled, ids))
        other = xl_single.predict_noise(lat, t, cond, added_conditions(pooled, ids + torch.tensor([0, 0, 8, 0, 0, 0])))
    assert got.shape == lat.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    assert not torch.allclose(got, other)  # the crop conditioning reaches the output
    with pytest.raises(ValueError):
        xl_single.predict_noise(lat, t, cond)


# --------------------------------------------------------------------------------------------
# kohya names


_ATTN = re.compile(r"^((?:input_blocks|output_blocks)\.\d+\.1|middle_block\.1)\.(proj_in|proj_out|transformer_blocks\..+)$")
_RES = re.compile(r"^(input_blocks\.\d+\.0|middle_block\.[02]|output_blocks\.\d+\.0)\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)$")
_SAMPLER = re.compile(r"^(input_blocks\.\d+\.0\.op|output_blocks\.\d+\.[12]\.conv)$")
_CLIP_TE = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"}
# the WebUI's Lora extension (extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis)
# reads lora_te2_…: mlp_fc1 -> mlp_c_fc, mlp_fc2 -> mlp_c_proj, self_attn -> attn, and q/k/v_proj
# of one layer onto the fused attn (in_proj); so each open_clip block yields these six names
_OPEN_CLIP_TE = {"attn.in_proj_weight": ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj"],
                 "attn.out_proj.weight": ["self_attn_out_proj"], "mlp.c_fc.weight": ["mlp_fc1"],
                 "mlp.c_proj.weight": ["mlp_fc2"]}


def expected_kohya_names(sd: dict[str, torch.Tensor], conv: bool = False) -> set[str]:
    """kohya's names for an SDXL single file, from its keys alone: every Linear/Conv2d weight
    (2-D or 4-D) inside a spatial transformer (plus ResNet and sampler convs when `conv`),
    named `lora_unet_` + sgm path; CLIP-L layers `lora_te1_` + transformers path; bigG blocks
    as the WebUI maps them back."""
    names = set()
    for key, v in sd.items():
        if key.startswith("model.diffusion_model.") and key.endswith(".weight") and v.ndim in (2, 4):
            path = key[len("model.diffusion_model."):-len(".weight")]
            if _ATTN.match(path) or (conv and (_RES.match(path) or _SAMPLER.match(path))):
                names.add("lora_unet_" + path.replace(".", "_"))
        m = re.match(r"conditioner\.embedders\.0\.transformer\.text_model\.encoder\.layers\.(\d+)\.(.+)\.weight$", key)
        if m and m[2] in _CLIP_TE:
            names.add(f"lora_te1_text_model_encoder_layers_{m[1]}_{m[2].replace('.', '_')}")
        m = re.match(r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.(.+)$", key)
        if m and m[2] in _OPEN_CLIP_TE:
            names.update(f"lora_te2_text_model_encoder_layers_{m[1]}_{s}" for s in _OPEN_CLIP_TE[m[2]])
    return names


def test_lora_targets_are_the_names_kohya_and_the_webui_derive_from_the_file(xl_single, sgm_reference):
    sd = sgm_reference[0]
    targets = xl_single.lora_targets()
    names = [t.name for t in targets]
    assert len(names) == len(set(names))
    assert set(names) == expected_kohya_names(sd)
    assert "lora_unet_input_blocks_4_1_proj_in" in names and "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2" in names
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in names
    conv = xl_single.lora_targets(conv=True)
    assert {t.name for t in conv} == expected_kohya_names(sd, conv=True)
    # each target module has the shape of the file's weight it names (the mapping is not just a name set)
    for t in conv:
        if t.name.startswith("lora_unet_"):
            key = "model.diffusion_model." + _sgm_path(t.name[len("lora_unet_"):], sd) + ".weight"
            assert tuple(t.module.weight.shape) == tuple(sd[key].shape), t.name


def _sgm_path(underscored: str, sd) -> str:
    for key in sd:
        if key.startswith("model.diffusion_model.") and key.endswith(".weight"):
            path = key[len("model.diffusion_model."):-len(".weight")]
            if path.replace(".", "_") == underscored:
                return path
    raise KeyError(underscored)


def test_diffusers_and_compvis_paths_invert_each_other(xl_single):
    from lib_lora.training.naming import compvis_to_diffusers, diffusers_to_compvis

    up_attention = (True, True, False)
    seen = 0
    for name, module in xl_single.unet.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):  # every module a LoRA can wrap, and the top ones
            compvis = diffusers_to_compvis(name, up_attention)
            assert compvis_to_diffusers(compvis) == name, (name, compvis)
            seen += 1
    assert seen > 100


def test_full_size_sdxl_has_kohyas_722_unet_72_te1_and_192_te2_targets():
    """SDXL base 1.0's shapes (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json; bigG's
    text tower: width 1280, 32 layers, 20 heads) on the meta device; kohya's log for an SDXL
    LoRA: "create LoRA for U-Net: 722 modules", 72 for TE1 and 192 for TE2 (32 x 6)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lib_lora.training.family import SDXL
    from lib_lora.training.models import sd15_text_encoder_config, sd15_unet_config
    from lib_lora.training.naming import text_encoder_targets, unet_targets

    cfg = {k: v for k, v in sd15_unet_config().items() if not k.startswith("_")}
    cfg.update(block_out_channels=[320, 640, 1280], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
               "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
               attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
               cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2816, sample_size=128)
    te2_cfg = sd15_text_encoder_config()
    te2_cfg.hidden_size, te2_cfg.intermediate_size, te2_cfg.num_hidden_layers = 1280, 5120, 32
    te2_cfg.num_attention_heads, te2_cfg.projection_dim, te2_cfg.hidden_act = 20, 1280, "gelu"
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
        te1, te2 = CLIPTextModel(sd15_text_encoder_config()), CLIPTextModelWithProjection(te2_cfg)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base's U-Net
    u = unet_targets(unet, key_space=SDXL.unet_key_space)
    assert len(u) == 722 and len({t.name for t in u}) == 722
    te1_prefix, te2_prefix = SDXL.text_encoder_prefixes
    assert len(text_encoder_targets(te1, te1_prefix)) == 72 and len(text_encoder_targets(te2, te2_prefix)) == 192
    names = {t.name for t in u}
    # sgm layout: level 1 at input_blocks 4, 5 (depth 2), level 2 at 7, 8 (depth 10); up: 0-2 deep, 3-5 mid
    assert "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k" in names
    assert "lora_unet_output_blocks_2_1_transformer_blocks_9_ff_net_2" in names
    assert "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_out_0" in names
    assert not any(n.startswith(("lora_unet_input_blocks_1_", "lora_unet_output_blocks_6_")) for n in names)


def test_diffusers_to_compvis_inverts_the_sd15_mapping_too():
    """SD1.5's first up block has no attention, so its up-sampler is output_blocks.2.1.conv."""
    from diffusers import UNet2DConditionModel

    from lib_lora.training.models import sd15_unet_config
    from lib_lora.training.naming import compvis_to_diffusers, diffusers_to_compvis

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in sd15_unet_config().items() if not k.startswith("_")})
    up_attention = tuple(hasattr(b, "attentions") for b in unet.up_blocks)
    assert diffusers_to_compvis("up_blocks.0.upsamplers.0.conv", up_attention) == "output_blocks.2.1.conv"
    assert diffusers_to_compvis("up_blocks.1.upsamplers.0.conv", up_attention) == "output_blocks.5.2.conv"
    n = 0
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            assert compvis_to_diffusers(diffusers_to_compvis(name, up_attention)) == name
            n += 1
    assert n == 282  # every Linear/Conv2d of SD1.5's U-Net


# --------------------------------------------------------------------------------------------
# The built-in tiny-sdxl (written by tiny_model through checkpoint_layout's sgm writer)


@pytest.fixture(scope="session")
def tiny_sdxl():
    from lib_lora.training.models_sdxl import load_backbone

    return load_backbone("tiny-sdxl")


def test_tiny_sdxl_loads_every_weight_the_writer_drew(tiny_sdxl):
    from lib_lora.training import tiny_model

    assert isinstance(tiny_sdxl, SDXLBackbone) and tiny_sdxl.model_name == "tiny-sdxl"
    refs = dict(zip(("unet", "vae", "te1", "te2"), tiny_model.build_sdxl_modules(), strict=True))
    mine = {"unet": tiny_sdxl.unet, "vae": tiny_sdxl.vae, "te1": tiny_sdxl.text_encoder, "te2": tiny_sdxl.text_encoder_2}
    for scope, ref in refs.items():
        want = tiny_model.random_state_dict(ref, tiny_model.TINY_SEED, scope)
        got = {k: v for k, v in mine[scope].state_dict().items() if not k.endswith("position_ids")}
        assert got.keys() == want.keys(), scope
        for k in want:
            assert torch.equal(got[k], want[k].to(got[k].dtype)), f"{scope}.{k}"
    assert list(tiny_sdxl.unet.config.transformer_layers_per_block) == [1, 2, 2]


def test_tiny_sdxl_targets_are_the_names_derived_from_its_file(tiny_sdxl):
    from safetensors.torch import load_file

    from lib_lora.training.tiny_model import ensure_tiny_checkpoint

    sd = load_file(str(ensure_tiny_checkpoint(family="sdxl")))
    assert {t.name for t in tiny_sdxl.lora_targets()} == expected_kohya_names(sd)
    assert {t.name for t in tiny_sdxl.lora_targets(conv=True)} == expected_kohya_names(sd, conv=True)
    with torch.no_grad():
        tc = tiny_sdxl.encode_text(_ids([320, 1125]))
        ids = bucket_time_ids([(64, 48)], (64, 64))
        eps = tiny_sdxl.predict_noise(torch.randn(1, 4, 8, 8), torch.tensor([500]), tc.cond, added_conditions(tc.pooled, ids))
    assert eps.shape == (1, 4, 8, 8) and torch.isfinite(eps).all()


def test_family_of_a_weights_only_ckpt_is_read_without_loading_it(sgm_reference, tmp_path):
    from lib_lora.training.models_sdxl import model_family

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sgm_reference[0]}, str(path))
    assert model_family(str(path)) == "sdxl"
