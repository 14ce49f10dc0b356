"""`python -m lib_lora train` end to end on the tiny model."""

import json
import subprocess
import sys
from pathlib import Path

from lib_lora.cli import main
from lib_lora.training.export import read_metadata


def test_cli_train_end_to_end(tmp_path, drawn_dataset, capsys):
    out, run = tmp_path / "lora", tmp_path / "run"
    argv = ["train", str(drawn_dataset), "--name", "小明 v1", "--base-model", "tiny", "--output-dir", str(out),
            "--run-dir", str(run), "--max-steps", "4", "--resolution", "64", "--dim", "4", "--alpha", "2",
            "--lr", "5e-4", "--optimizer", "adamw8bit", "--save-every-n-steps", "2", "--log-every-n-steps", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    lora = out / "小明 v1.safetensors"
    assert lora.is_file() and str(lora) in printed.out
    assert "Steps: 8 per epoch (batch 1); max_steps = 4 steps" in printed.err  # 4 images x 2 repeats
    md = read_metadata(lora)
    assert md["ss_steps"] == "4" and md["ss_network_dim"] == "4" and md["ss_learning_rate"] == "0.0005"
    assert md["ss_text_encoder_lr"] == "5e-05"  # te lr = lr x 0.1
    assert json.loads((run / "config.json").read_text(encoding="utf-8"))["dim"] == 4
    assert (run / "checkpoints" / "小明 v1-step000002.safetensors").is_file()
    # AdamW8bit cannot step on this CPU: the run says so once and uses torch AdamW.
    if "cannot step" in printed.err:
        assert md["ss_optimizer"].startswith("torch.optim.adamw.AdamW")
    else:  # a bitsandbytes that can step here: then it is what trained
        assert "AdamW8bit" in md["ss_optimizer"], md["ss_optimizer"]
    # Refuses to overwrite, with a message instead of a traceback; unsafe names are refused.
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(argv[:2] + ["--name", "../escape"] + argv[4:]) == 2
    assert "leave the output folder" in capsys.readouterr().err


def test_cli_plan_only_and_missing_dataset(tmp_path, drawn_dataset):
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "lib_lora", "train", str(drawn_dataset), "--plan-only", "--resolution", "64",
         "--batch-size", "3", "--epochs", "2"],
        capture_output=True, text=True, cwd=root, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "8 with repeats" in proc.stdout and "3 per epoch (batch 3) x 2 epochs = 6 steps" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "lib_lora", "train", str(tmp_path / "nope"), "--name", "x"],
        capture_output=True, text=True, cwd=root, timeout=120,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_preset_then_flags_override(drawn_dataset):
    import argparse

    from lib_lora.training.cli import config_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train", str(drawn_dataset / "2_fastlora_chan"), "--preset", "style", "--dim", "8"])
    cfg = config_from_args(args)
    assert (cfg.dim, cfg.alpha, cfg.lr_scheduler, cfg.shuffle_caption) == (8, 16.0, "cosine", True)
    assert cfg.name == "fastlora_chan"  # no --name: the folder's name without its repeats


def test_help_says_which_defaults_are_the_familys(drawn_dataset):
    """`train --help` gives the defaults that depend on the base model's family per family, and
    the flags behave so: no --train-text-encoder is on for SD1.5 and off for SDXL."""
    import argparse

    from lib_lora.training.cli import config_from_args, register
    from lib_lora.training.family import SD15, SDXL

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    help_text = " ".join(sub.format_help().split())
    assert "(default: True on SD1.5, False on SDXL: the base model's family decides)" in help_text
    assert "(default: 512 on SD1.5, 1024 on SDXL: the base model's family decides)" in help_text
    folder = str(drawn_dataset / "2_fastlora_chan")
    sd15 = config_from_args(parser.parse_args(["train", folder]))
    xl = config_from_args(parser.parse_args(["train", folder, "--base-model", "tiny-sdxl"]))
    assert sd15.train_text_encoder is SD15.default_train_text_encoder is True
    assert xl.train_text_encoder is SDXL.default_train_text_encoder is False
