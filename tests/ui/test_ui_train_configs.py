"""The Train tab's Save config / Load config and user presets, without a browser: the same
files the CLI reads and writes, paths through the path policy, one sentence for bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr
import pytest
from helpers_ui import form_values, train_form
from PIL import Image

from lib_lora import config
from lib_lora.cli import main
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.ui import tab_train
from lib_lora.ui.context import UIContext
from lib_lora.ui.paths import FolderPolicy

KOHYA = Path(__file__).resolve().parents[1] / "fixtures" / "kohya"


@pytest.fixture()
def ctx(tmp_path: Path) -> UIContext:
    host = StandaloneHost(output_dir=tmp_path / "loras", work_dir=tmp_path / "work", device="cpu")
    return UIContext(host=host)


def controls(form, out: list) -> dict:
    return dict(zip(form.names, out[-len(form.names):], strict=True))


def test_save_config_then_load_config_gives_the_form_back(ctx: UIContext, tmp_path: Path) -> None:
    form = train_form()
    (tmp_path / "ds").mkdir()
    Image.new("RGB", (64, 64), (90, 80, 120)).save(tmp_path / "ds" / "a.png")
    saved = form_values(form, dim=8, alpha=4.0, optimizer="prodigy", shuffle_caption=True, max_steps="40")
    path = tmp_path / "work" / "mine.toml"
    status = tab_train.save_config(ctx, form, str(path), "my lora", str(tmp_path / "ds"), "manual", "3e-4", *saved)
    assert "fast-lora-msg-ok" in status and path.is_file()
    out = tab_train.load_config(ctx, form, str(path), *form_values(form))
    assert "fast-lora-msg-ok" in out[0]
    assert out[1] == "my lora" and out[2] == str((tmp_path / "ds").resolve()) and out[3:5] == ["manual", "3e-4"]
    got = controls(form, out)
    assert (got["dim"], got["alpha"], got["optimizer"], got["shuffle_caption"], str(got["max_steps"])) == \
        (8, 4.0, "prodigy", True, "40")
    # The CLI reads the page's file as its own.
    assert main(["train", "--config", str(path), "--plan-only"]) == 0


def test_load_config_takes_a_kohya_file_and_names_what_it_cannot_use(ctx: UIContext, tmp_path: Path) -> None:
    form = train_form()
    path = tmp_path / "kohya.json"
    shutil.copy(KOHYA / "kohya_ss_lora.json", path)
    out = tab_train.load_config(ctx, form, str(path), *form_values(form))
    got = controls(form, out)
    assert (got["dim"], got["alpha"], str(got["max_steps"]), got["resolution"]) == (4, 2.0, "4", 64)
    assert out[1] == "kohya_gui_lora" and out[3:5] == ["manual", "0.0005"]
    assert "logging_dir = './log', random_crop = true" in out[0]
    assert "output_dir" in out[0]  # the page decides the LoRA folder: said, not silently dropped


def test_bad_config_files_and_paths_get_one_sentence(ctx: UIContext, tmp_path: Path) -> None:
    form = train_form()
    bad = tmp_path / "bad.toml"
    bad.write_text("dim = 'many'\n", encoding="utf-8")
    out = tab_train.load_config(ctx, form, str(bad), *form_values(form))
    assert "fast-lora-msg-error" in out[0] and "In bad.toml: dim = 'many' is not a whole number" in out[0]
    assert all(isinstance(o, dict) for o in out[1:])  # nothing in the form changed
    missing = tab_train.load_config(ctx, form, str(tmp_path / "nope.toml"), *form_values(form))
    assert "does not exist" in missing[0]
    # Beyond loopback, a config path outside the allowed folders is refused, for loading and saving.
    ctx.policy = FolderPolicy.limited([tmp_path / "work", tmp_path / "loras"])
    outside = tmp_path / "elsewhere" / "run.toml"
    out = tab_train.load_config(ctx, form, str(outside), *form_values(form))
    assert "outside the folders this server may use" in out[0]
    (tmp_path / "work" / "ds").mkdir(parents=True)
    status = tab_train.save_config(ctx, form, str(outside), "x", str(tmp_path / "work" / "ds"), "manual", "1e-4",
                                   *form_values(form))
    assert "outside the folders this server may use" in status and not outside.exists()


def test_user_preset_is_saved_listed_and_fills_the_form(ctx: UIContext) -> None:
    form = train_form()
    status, radio = tab_train.save_preset(ctx, form, "my style", "manual", "2e-4",
                                          *form_values(form, dim=12, lr_scheduler="cosine"))
    assert "fast-lora-msg-ok" in status
    assert radio["choices"][:len(config.PRESETS)] == list(config.PRESETS) and "my style" in radio["choices"]
    assert radio["value"] == "my style"
    assert (ctx.host.work_dir() / "presets" / "my style.toml").is_file()
    out = tab_train.preset_values(form, "my style", *form_values(form), ctx=ctx)
    got = controls(form, out)
    assert (got["dim"], got["lr_scheduler"], out[0], out[1]) == (12, "cosine", "manual", "2e-4")
    # Listed beside the built-in ones when the page opens.
    with gr.Blocks():
        parts = tab_train.build(ctx)
    choices = [c[0] if isinstance(c, tuple | list) else c for c in parts["preset"].choices]
    assert choices == [*config.PRESETS, "my style"]
    # A built-in name or a name that leaves the folder is refused in one sentence.
    for name, words in (("person", "is a built-in preset"), ("../up", "which could leave the output folder")):
        status, radio = tab_train.save_preset(ctx, form, name, "manual", "2e-4", *form_values(form))
        assert "fast-lora-msg-error" in status and words in status and radio == gr.update()
    # The CLI finds the page's presets in the same folder.
    args = ["train", "--preset", "my style", "--presets-dir", str(ctx.host.work_dir() / "presets")]
    import argparse

    from lib_lora.training.cli import config_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    cfg = config_from_args(parser.parse_args(args))
    assert (cfg.dim, cfg.lr, cfg.lr_scheduler) == (12, "2e-4", "cosine")
