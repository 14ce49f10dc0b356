"""The sgm stand-in (tests/webui/fake_sgm) against facts read from the real source.

tests/webui/sgm_facts.json records, from Stability-AI/generative-models 0ad7de9 (and A1111
v1.10.1's modules/sd_models_xl.py), for each sgm class the stand-in imitates: its bases, the
`self.<name>` attributes its `__init__` sets, the parameter lists of the methods we call, and
SDXL base's inference config (configs/inference/sd_xl_base.yaml). It was written by a throwaway
`ast` pass over the real files. The OpenCLIP text tower (open_clip's CLIP, not part of sgm) is
not covered here: its layout is the single file's, which the stand-in loads strictly.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FACTS = json.loads((HERE / "sgm_facts.json").read_text(encoding="utf-8"))

OPENAI = "sgm/modules/diffusionmodules/openaimodel.py"
ATTENTION = "sgm/modules/attention.py"
ENCODERS = "sgm/modules/encoders/modules.py"
# stand-in class name -> the real class's fact key
REAL = {
    "UNetModel": f"{OPENAI}:UNetModel", "ResBlock": f"{OPENAI}:ResBlock", "Downsample": f"{OPENAI}:Downsample",
    "Upsample": f"{OPENAI}:Upsample", "SpatialTransformer": f"{ATTENTION}:SpatialTransformer",
    "BasicTransformerBlock": f"{ATTENTION}:BasicTransformerBlock", "CrossAttention": f"{ATTENTION}:CrossAttention",
    "FeedForward": f"{ATTENTION}:FeedForward", "GeneralConditioner": f"{ENCODERS}:GeneralConditioner",
    "FrozenCLIPEmbedder": f"{ENCODERS}:FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2": f"{ENCODERS}:FrozenOpenCLIPEmbedder2",
    "ConcatTimestepEmbedderND": f"{ENCODERS}:ConcatTimestepEmbedderND",
    "OpenAIWrapper": "sgm/modules/diffusionmodules/wrappers.py:OpenAIWrapper",
    "DiffusionEngine": "sgm/models/diffusion.py:DiffusionEngine",
}
# Deviations, each with its reason; a fact check skips exactly these.
SIGNATURE_DEVIATIONS = {
    # ldm's block (the stand-in reuses it): sgm added two video-only keyword arguments
    "BasicTransformerBlock.forward": "sgm adds additional_tokens / n_times_crossframe_attn_in_self (video models)",
    # training never runs the conditioner; the stand-in keeps nn.Module's forward
    "GeneralConditioner.forward": "not imitated: training encodes text through the embedders themselves",
}
EXTRA_CHILDREN = {
    ("OpenAIWrapper", "diffusion_model"): "set by IdentityWrapper.__init__, OpenAIWrapper's base",
    ("DiffusionEngine", "first_stage_model"): "set by DiffusionEngine._init_first_stage",
}


@pytest.fixture
def sgm_model(sgm_model_read_only):
    return sgm_model_read_only


def _params(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()]


def test_the_facts_name_their_source():
    assert FACTS["source"]["commit"] == "0ad7de9"
    assert FACTS["source"]["a1111"]["commit"] == "82a973c04367123ae98bd9abdf80d9eda9b910e2"


def test_every_stand_in_module_has_the_real_classes_child_names(sgm_model):
    seen = set()
    # the VAE is ldm's AutoencoderKL layout (its own Downsample/Upsample), not covered here
    for module in [sgm_model, *sgm_model.model.modules(), *sgm_model.conditioner.modules()]:
        cls = type(module).__name__
        if cls not in REAL:
            continue
        seen.add(cls)
        real = FACTS["classes"][REAL[cls]]["init_self_attributes"]
        for child in module._modules:
            if (cls, child) in EXTRA_CHILDREN or child.isdigit():
                continue
            assert child in real, f"{cls}.{child} is not an attribute sgm's {cls} sets"
    assert seen == set(REAL), sorted(set(REAL) - seen)


@pytest.mark.parametrize("cls", sorted(REAL))
def test_forward_signatures_match_sgm(sgm_model, cls):
    module = next(m for m in [sgm_model, *sgm_model.model.modules(), *sgm_model.conditioner.modules()]
                  if type(m).__name__ == cls)
    for method, params in FACTS["classes"][REAL[cls]]["methods"].items():
        if f"{cls}.{method}" in SIGNATURE_DEVIATIONS:
            continue
        ours = _params(getattr(type(module), method))
        assert ours == [p["name"] for p in params], f"{cls}.{method}"


def test_a1111s_sd_models_xl_additions_are_imitated(sgm_model):
    for name, params in FACTS["a1111_sd_models_xl"]["functions"].items():
        if name == "extend_sdxl":
            continue  # a function over the model, not a method
        assert _params(getattr(type(sgm_model), name)) == [p["name"] for p in params], name
    assert FACTS["a1111_repair_config_sets_use_checkpoint_false"]  # hence use_checkpoint=False in the stand-in


def test_the_stand_in_is_built_as_sdxl_base_is_configured(sgm_model):
    from fake_sgm import TINY_SGM_UNET_KWARGS

    cfg = FACTS["sd_xl_base_yaml"]
    real = cfg["network"]["params"]
    assert cfg["network"]["target"] == "sgm.modules.diffusionmodules.openaimodel.UNetModel"
    assert set(TINY_SGM_UNET_KWARGS) <= set(real)
    for key in ("in_channels", "out_channels", "num_res_blocks", "num_head_channels"):
        assert TINY_SGM_UNET_KWARGS[key] == real[key], key
    assert sorted(TINY_SGM_UNET_KWARGS["attention_resolutions"]) == sorted(real["attention_resolutions"])
    assert len(TINY_SGM_UNET_KWARGS["channel_mult"]) == len(real["channel_mult"])
    assert real["num_classes"] == "sequential" and real["use_linear_in_transformer"] is True
    assert sgm_model.scale_factor == cfg["scale_factor"]
    unet = sgm_model.model.diffusion_model
    assert unet.num_classes == real["num_classes"]
    assert all(m.use_linear for m in unet.modules() if type(m).__name__ == "SpatialTransformer")
    embedders = list(sgm_model.conditioner.embedders)
    assert [type(e).__name__ for e in embedders] == [e["target"].rsplit(".", 1)[1] for e in cfg["embedders"]]
    assert [e.input_key for e in embedders] == [e["input_key"] for e in cfg["embedders"]]
    te1, te2 = embedders[0], embedders[1]
    assert (te1.layer, te1.layer_idx) == (cfg["embedders"][0]["params"]["layer"], cfg["embedders"][0]["params"]["layer_idx"])
    p2 = cfg["embedders"][1]["params"]
    assert (te2.layer, te2.return_pooled, te2.legacy) == (p2["layer"], p2["always_return_pooled"], p2["legacy"])
    assert all(e.outdim * 6 + 128 == unet.label_emb[0][0].in_features for e in embedders[2:])
    assert {e["params"]["outdim"] for e in cfg["embedders"][2:]} == {256}  # full size: 2816 = 1280 + 6 * 256
    assert real["adm_in_channels"] == 1280 + 6 * 256
