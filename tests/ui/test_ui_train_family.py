"""The Train tab follows the model family of the chosen (standalone) or loaded (WebUI) model:
its fields open on that family's defaults and recipe, a change of model refills what the user
left as filled, and a value the user set is kept by the run even where it equals SD1.5's default.

These run under both gradio 3.41 (main env) and gradio 4 (.venv-gradio4)."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from lib_lora import config
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.training.family import SD15, SDXL
from lib_lora.ui import forms, tab_train
from lib_lora.ui.context import UIContext


def _ctx(tmp_path: Path, base_model: str) -> UIContext:
    host = StandaloneHost(base_model=base_model, output_dir=tmp_path / "loras", work_dir=tmp_path / "work",
                          device="cpu")
    return UIContext(host=host)


def _built(ctx: UIContext) -> dict:
    with gr.Blocks():
        return tab_train.build(ctx)


def _value(parts: dict, name: str):
    return config.coerce(config.TrainConfig, name, parts["controls"][name].value)


@pytest.mark.parametrize("base_model, family", [("tiny", SD15), ("tiny-sdxl", SDXL)])
def test_the_tab_opens_on_the_chosen_models_family(tmp_path: Path, base_model: str, family) -> None:
    parts = _built(_ctx(tmp_path, base_model))
    recipe = family.presets[parts["preset"].value]
    assert parts["shown"].value == family.name
    assert family.label in parts["family"].value
    assert _value(parts, "resolution") == family.default_resolution
    assert (_value(parts, "min_bucket_reso"), _value(parts, "max_bucket_reso")) == family.bucket_range
    assert _value(parts, "train_text_encoder") is recipe.get("train_text_encoder", family.default_train_text_encoder)
    for name in ("dim", "alpha", "repeats", "optimizer"):
        assert _value(parts, name) == recipe[name], name
    if family is SDXL:
        assert (_value(parts, "resolution"), _value(parts, "dim"), _value(parts, "train_text_encoder")) == (1024, 32, False)


def test_choosing_an_sdxl_model_refills_what_the_user_left_and_keeps_what_they_changed(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, "tiny")
    parts = _built(ctx)
    form = parts["form"]
    values = [parts["controls"][n].value for n in form.names]
    values[form.names.index("epochs")] = 7  # the user's own choice
    out = tab_train.family_values(ctx, form, parts["shown"].value, parts["preset"].value, "tiny-sdxl", *values)
    shown, line, controls = out[0], out[1], dict(zip(form.names, out[2:], strict=True))
    assert shown == "sdxl" and "SDXL" in line
    assert controls["resolution"] == 1024 and controls["train_text_encoder"] is False
    assert controls["dim"] == SDXL.presets["person"]["dim"]
    assert isinstance(controls["epochs"], dict)  # an update that leaves the user's 7 alone
    # The same model again: nothing to refill.
    again = tab_train.family_values(ctx, form, "sdxl", "person", "tiny-sdxl", *values)
    assert all(isinstance(v, dict) for v in again[2:])


def test_presets_are_the_shown_familys() -> None:
    form = tab_train.TrainForm(["dim", "alpha", "resolution"], has_base_model=False)
    out = tab_train.preset_values(form, "style", 1, 1.0, 512, family=SDXL)
    assert out[2:] == [SDXL.presets["style"]["dim"], SDXL.presets["style"]["alpha"], 1024]


def test_a_value_the_user_set_to_sd15s_default_is_kept_on_sdxl(tmp_path: Path) -> None:
    """The user sets 512 px and the text encoder on, on an SDXL model: the run trains that,
    though both equal SD1.5's defaults; the fields left as filled are SDXL's."""
    ctx = _ctx(tmp_path, "tiny-sdxl")
    parts = _built(ctx)
    form = parts["form"]
    values = {n: parts["controls"][n].value for n in form.names}
    values.update(resolution=512, train_text_encoder=True, max_steps=1, dim=4, alpha=2.0, optimizer="adamw",
                  sample_images=0, cache_latents_to_disk=False, save_precision="fp32", mixed_precision="no",
                  gradient_checkpointing=False)
    sub = tmp_path / "ds" / "1_sks"
    sub.mkdir(parents=True)
    Image.new("RGB", (64, 64), (30, 120, 200)).save(sub / "a.png")  # its own 64 px bucket: a quick step
    (sub / "a.txt").write_text("sks, blue", encoding="utf-8")
    given = form.given(form.config(ctx, "xl", str(sub.parent), "manual", "1e-3", list(values.values())), SDXL,
                       "person")
    assert {"resolution", "train_text_encoder", "dim"} <= given and "min_bucket_reso" not in given
    # The tab's own sample images stay the tab's though left as filled (the schema's default is off).
    left = form.config(ctx, "xl", str(sub.parent), "manual", "1e-3", [parts["controls"][n].value for n in form.names])
    assert "sample_images" in form.given(left, SDXL, "person")
    out = list(tab_train.run_train(ctx, form, "xl", str(sub.parent), "manual", "1e-3", *values.values(),
                                   preset="person", shown="sdxl"))
    assert "fast-lora-msg-ok" in out[-1][0], out[-1][0]
    saved = json.loads((ctx.host.work_dir() / "runs" / "xl" / "config.json").read_text(encoding="utf-8"))
    assert (saved["resolution"], saved["train_text_encoder"], saved["min_bucket_reso"]) == (512, True, 512)


def test_the_sdxl_plan_says_the_family(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, "tiny-sdxl")
    form = tab_train.TrainForm([n for n in _built(ctx)["form"].names], has_base_model=True)
    sub = tmp_path / "ds" / "2_sks"
    sub.mkdir(parents=True)
    Image.new("RGB", (64, 64), (30, 120, 200)).save(sub / "a.png")
    shown = tab_train.filled(SDXL, "person")
    values = forms.values_of(shown, form.names)
    values[form.names.index("base_model")] = "tiny-sdxl"
    text, _ = tab_train.plan_texts(ctx, form, str(sub.parent), values, "manual", SDXL)
    assert "Model family: SDXL; resolution 1024, buckets 512-2048 px, training the U-Net only." in text, text


def test_start_with_a_user_preset_chosen_trains_the_form(tmp_path: Path) -> None:
    """A user preset's name is not one of the family's recipes: Start trains the form's values
    (the preset's, as filled) instead of failing on an unknown preset."""
    ctx = _ctx(tmp_path, "tiny")
    parts = _built(ctx)
    form = parts["form"]
    values = {n: parts["controls"][n].value for n in form.names}
    values.update(max_steps=1, dim=4, alpha=2.0, optimizer="adamw", sample_images=0, cache_latents_to_disk=False,
                  save_precision="fp32", mixed_precision="no", resolution=64, min_bucket_reso=64)
    status, _radio = tab_train.save_preset(ctx, form, "mine", "manual", "1e-3", *values.values())
    assert "fast-lora-msg-ok" in status, status
    sub = tmp_path / "ds" / "1_sks"
    sub.mkdir(parents=True)
    Image.new("RGB", (64, 64), (30, 120, 200)).save(sub / "a.png")
    (sub / "a.txt").write_text("sks, blue", encoding="utf-8")
    out = list(tab_train.run_train(ctx, form, "mine_run", str(sub.parent), "manual", "1e-3", *values.values(),
                                   preset="mine", shown="sd15"))
    assert "fast-lora-msg-ok" in out[-1][0], out[-1][0]
    saved = json.loads((ctx.host.work_dir() / "runs" / "mine_run" / "config.json").read_text(encoding="utf-8"))
    assert (saved["dim"], saved["resolution"]) == (4, 64)
