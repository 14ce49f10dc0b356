"""Unsafe names and paths are refused through the CLI; nothing unsafe is loaded or shelled."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers_rel import make_dataset

from lib_lora.cli import main
from lib_lora.names import validate_name

BAD_NAMES = ["../evil", "a/b", "a\\b", "/abs/path", "C:evil", "c:\\x", "CON", "nul.txt", "com1", "LPT9.safetensors",
             "a\x00b", "bad\nname", "tab\tname", "..", ".", ".hidden", "x..y", "end.", "   ", "a" * 500,
             "zero\u200bwidth", "rtl\u202eexe.fdp"]  # fmt: skip


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_refused_by_the_cli(tmp_path, capsys, name):
    ds = make_dataset(tmp_path / "data", n=1)
    rc = main(["train", str(ds), "--name", name, "--output-dir", str(tmp_path / "out"), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "evil.safetensors").exists() and not (tmp_path.parent / "evil.safetensors").exists()


@pytest.mark.parametrize("name", ["张娜英", "Zhang NaYing", "émilie-2", "ナルト_v1", "my.lora (v2)"])
def test_unicode_names_allowed(name):
    assert validate_name(name) == name


def test_existing_lora_not_overwritten(tmp_path, capsys):
    ds = make_dataset(tmp_path / "data", n=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.safetensors").write_bytes(b"someone else's LoRA")
    rc = main(["train", str(ds), "--name", "mine", "--output-dir", str(out), "--max-steps", "1"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert (out / "mine.safetensors").read_bytes() == b"someone else's LoRA"


def test_no_unsafe_loading_or_shell_in_the_code():
    root = Path(__file__).resolve().parents[2] / "lib_lora"
    problems = []
    for py in root.rglob("*.py"):
        text = py.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\((.*)", text):  # the call's line (a call fits one here)
            if "weights_only=True" not in m.group(1):
                problems.append(f"{py.name}: torch.load without weights_only=True")
        if re.search(r"shell\s*=\s*True", text):
            problems.append(f"{py.name}: shell=True")
        if re.search(r"\bos\.system\(|\bpickle\.loads?\(", text):
            problems.append(f"{py.name}: os.system/pickle")
    assert problems == []
