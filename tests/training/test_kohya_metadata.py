"""The LoRA's metadata is what kohya's sd-scripts writes for the same run (train_network.py,
library/train_util.py, library/sai_model_spec.py), with our fastlora_* keys beside it; captions
are tokenized up to the max_token_length option; the plan says the learning rates."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from lib_lora.config import TrainConfig, validate
from lib_lora.errors import UserError
from lib_lora.training import data
from lib_lora.training.export import legacy_hash, read_lora
from lib_lora.training.metadata import RunInfo, build_metadata
from lib_lora.training.optim import lr_plan
from lib_lora.training.run import train


def _cfg(tmp_path: Path, dataset: Path, **kw) -> TrainConfig:
    base = dict(name="kohya_md", dataset=str(dataset), output_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"),
                resolution=64, min_bucket_reso=64, max_bucket_reso=128, dim=4, alpha=4.0, lr="1e-3",
                optimizer="adamw", lr_scheduler="constant", device="cpu", max_steps=2, log_every_n_steps=1,
                save_precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def _dataset(root: Path, captions: dict[str, tuple[tuple[int, int], str]], folder: str = "3_tok") -> Path:
    sub = root / folder
    sub.mkdir(parents=True)
    for stem, (size, caption) in captions.items():
        Image.new("RGB", size, (120, 60, 30)).save(sub / f"{stem}.png")
        (sub / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return root


def _run_info(**kw) -> RunInfo:
    base = dict(started_at=1_700_000_000.7, unet_lr=1e-4, text_encoder_lr=1e-5, optimizer="torch.optim.adamw.AdamW",
                optimizer_args="", mixed_precision="no", model_name="m.safetensors", model_hash="ab" * 32,
                session_id="1")
    base.update(kw)
    return RunInfo(**base)


# ---- ss_tag_frequency and ss_bucket_info ---------------------------------------------------------


def test_tag_frequency_counts_tags_case_insensitively(tmp_path):
    ds = _dataset(tmp_path / "ds", {"a": ((64, 64), "tok, Red Shirt, smile"), "b": ((64, 64), "tok, red shirt,  SMILE ,")})
    freq = data.tag_frequency(data.scan_dataset(ds, TrainConfig(resolution=64, min_bucket_reso=64)))
    # kohya: each tag stripped, empty ones dropped, lower-cased; one count per image (not per repeat).
    assert freq == {"3_tok": {"tok": 2, "red shirt": 2, "smile": 2}}


def test_bucket_info_counts_repeats_and_the_mean_aspect_error(tmp_path):
    # At 64 px in 32 px steps: 64x64 keeps its size (error 0); 64x48 is within the area and is
    # floored to 64x32 (error |2 - 4/3|); 80x64 is over it: scaled to 71.6x57.2, height first
    # gives 32x32 (error 0.25), width first 64x32 (error 0.75), so 32x32.
    ds = _dataset(tmp_path / "ds", {"a": ((64, 64), "tok"), "b": ((80, 64), "tok"), "c": ((64, 48), "tok")})
    cfg = TrainConfig(resolution=64, bucket_reso_steps=32, min_bucket_reso=64)
    scanned = data.scan_dataset(ds, cfg)
    assert {it.path.stem: it.bucket for it in scanned.items} == {"a": (64, 64), "b": (32, 32), "c": (64, 32)}
    info = data.bucket_info(scanned.items, cfg)
    # (width, height) order, each count images x 3 repeats
    assert info["buckets"] == {"0": {"resolution": [32, 32], "count": 3}, "1": {"resolution": [64, 32], "count": 3},
                               "2": {"resolution": [64, 64], "count": 3}}
    assert info["mean_img_ar_error"] == pytest.approx((0 + abs(1 - 80 / 64) + abs(2 - 64 / 48)) / 3, rel=1e-12)
    assert data.bucket_info(scanned.items, dataclasses.replace(cfg, enable_buckets=False)) is None


# ---- one run's metadata, key by key ----------------------------------------------------------------


def test_a_default_run_writes_kohyas_keys(tmp_path, tiny_backbone, tiny_checkpoint):
    ds = _dataset(tmp_path / "ds", {"a": ((64, 64), "tok, Blue"), "b": ((64, 64), "tok, blue")})
    res = train(_cfg(tmp_path, ds), backbone=tiny_backbone)
    md = read_lora(res.lora_path)[1]
    # modelspec as sai_model_spec.build_metadata writes an SD1.5 LoRA's
    assert md["modelspec.sai_model_spec"] == "1.0.1"
    assert md["modelspec.implementation"] == "diffusers"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert re.fullmatch(r"fast-lora/\S+", md["modelspec.implementation_version"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", md["modelspec.date"])  # local time, no offset
    assert "modelspec.encoder_layer" not in md  # no clip skip given
    # ss_*: no skip is None (the WebUI's card then shows no "Clip skip"); no network args, no key
    assert md["ss_clip_skip"] == "None"
    assert "ss_network_args" not in md
    assert md["ss_optimizer"] == "torch.optim.adamw.AdamW"  # weight decay 0.01 is AdamW's own default
    assert md["ss_max_token_length"] == "225"
    assert md["ss_sd_model_hash"] == legacy_hash(tiny_checkpoint)
    assert re.fullmatch(r"[0-9a-f]{8}", md["ss_sd_model_hash"])
    assert json.loads(md["ss_tag_frequency"]) == {"3_tok": {"tok": 2, "blue": 2}}
    assert json.loads(md["ss_bucket_info"]) == {"buckets": {"0": {"resolution": [64, 64], "count": 6}},
                                                "mean_img_ar_error": 0.0}
    assert json.loads(md["fastlora_config"])["max_token_length"] == 225  # ours stay


def test_given_options_are_written_as_kohya_writes_them(tmp_path):
    plan_ds = _dataset(tmp_path / "ds", {"a": ((64, 64), "tok")})
    cfg = _cfg(tmp_path, plan_ds, clip_skip=2, conv_dim=2, conv_alpha=1.0, max_token_length=150)
    plan = data.scan_dataset(plan_ds, cfg).plan
    md = build_metadata(cfg, plan, _run_info(optimizer="dadaptation.dadapt_adam.DAdaptAdam",
                                             optimizer_args="weight_decay=0.01,decouple=True",
                                             model_legacy_hash="0123abcd"))
    assert md["ss_clip_skip"] == "2" and md["modelspec.encoder_layer"] == "2"
    # SDXL's text encoding ignores clip skip (kohya: sdxl_train_util.verify_sdxl_training_args warns
    # "clip_skip will be unexpected", strategy_sdxl takes the penultimate layers): "None" and no
    # encoder layer, what kohya's sdxl_train_network.py writes for a run without --clip_skip.
    from lib_lora.training.family import SDXL

    xl = build_metadata(cfg, plan, _run_info(), SDXL)
    assert xl["ss_clip_skip"] == "None" and "modelspec.encoder_layer" not in xl
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert md["ss_optimizer"] == "dadaptation.dadapt_adam.DAdaptAdam(weight_decay=0.01,decouple=True)"
    assert md["ss_max_token_length"] == "150"
    assert md["ss_sd_model_hash"] == "0123abcd"
    assert md["modelspec.date"] == dt.datetime.fromtimestamp(1_700_000_000).isoformat()
    # 75 tokens is kohya's default, which it writes as None; no legacy hash known: no key.
    md75 = build_metadata(dataclasses.replace(cfg, max_token_length=75), plan, _run_info())
    assert md75["ss_max_token_length"] == "None" and "ss_sd_model_hash" not in md75


def test_optimizer_arguments_are_only_those_given():
    import torch

    from lib_lora.training.optim import given_args

    assert given_args(torch.optim.AdamW, weight_decay=0.01) == ""
    assert given_args(torch.optim.AdamW, weight_decay=0.1) == "weight_decay=0.1"
    dadaptation = pytest.importorskip("dadaptation")
    assert given_args(dadaptation.DAdaptAdam, weight_decay=0.0, decouple=True) == "decouple=True"


# ---- max token length ---------------------------------------------------------------------------------


def test_max_token_length_is_a_schema_choice():
    assert TrainConfig().max_token_length == 225
    for n in (75, 150, 225):
        validate(TrainConfig(max_token_length=n))
    with pytest.raises(UserError, match="max_token_length"):
        validate(TrainConfig(max_token_length=100))


def test_captions_are_cut_at_max_token_length(tiny_backbone):
    caption = ", ".join(f"tag{i}" for i in range(120))  # far over 225 tokens
    for n in (75, 150, 225):
        tokens = data.CaptionTokens(tiny_backbone.tokenizer, max_tokens=n)
        chunks = tokens.chunks(caption)
        assert len(chunks) == n // 75 and all(len(c) == 77 for c in chunks)
        assert tokens.truncated == {caption}


def test_the_run_tokenizes_with_the_option(tmp_path, tiny_backbone):
    # ~100 tokens: within 150 and 225, over 75.
    caption = ", ".join(f"tag{i}" for i in range(33))
    assert 75 < len(tiny_backbone.tokenizer(caption, add_special_tokens=False).input_ids) <= 150
    ds = _dataset(tmp_path / "ds", {"a": ((64, 64), caption)})
    for n, cut in ((75, True), (150, False)):
        events: list[dict] = []
        res = train(_cfg(tmp_path / str(n), ds, max_token_length=n), backbone=tiny_backbone, on_event=events.append)
        warned = [e["text"] for e in events if e.get("level") == "warning" and "were cut" in e.get("text", "")]
        assert bool(warned) == cut, warned
        if cut:
            assert "longer than 75 tokens" in warned[0]
        assert read_lora(res.lora_path)[1]["ss_max_token_length"] == ("None" if n == 75 else str(n))


# ---- the plan says the learning rates ------------------------------------------------------------------


def test_the_plan_says_the_text_encoder_lr_and_kohyas_default(tmp_path, tiny_backbone):
    cfg = TrainConfig(lr="1e-4")
    line = lr_plan(cfg)
    assert "U-Net 0.0001" in line and "text encoder 1e-05 = 0.1 x the U-Net's" in line
    assert "kohya's default is the U-Net's own" in line
    assert "text encoder 3e-05 (--text-encoder-lr)" in lr_plan(dataclasses.replace(cfg, text_encoder_lr=3e-5))
    assert "not trained" in lr_plan(dataclasses.replace(cfg, train_text_encoder=False))
    assert "from the LR probe" in lr_plan(dataclasses.replace(cfg, lr="auto"))
    # The Train tab shows the U-Net's lr in its own control: the plan says the ratio.
    assert lr_plan(cfg, with_unet=False) == ("Text-encoder learning rate: 0.1 x the U-Net's "
                                             "(--te-lr-ratio; kohya's default is the U-Net's own).")
    # The run's plan event (what the CLI prints before training) carries it.
    events: list[dict] = []
    ds = _dataset(tmp_path / "ds", {"a": ((64, 64), "tok")})
    train(_cfg(tmp_path, ds), backbone=tiny_backbone, on_event=events.append)
    plan = next(e for e in events if e["kind"] == "plan")
    assert "text encoder 0.0001 = 0.1 x the U-Net's" in plan["text"]
