"""No lost work: the user's card files are never replaced without --overwrite, and kill -9 in
the middle of an export, an undo/redo or a prepare leaves nothing the next run cannot finish.

The kills are real: the CLI runs as a process that stops itself at a chosen point
(stop_at.py), the test kills it with SIGKILL there, then runs the next command as a user would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_rel import make_dataset, sha
from PIL import Image

from lib_lora.atomic import TMP_MARK
from lib_lora.cli import main
from lib_lora.training.export import read_metadata
from lib_lora.training.state import state_path

ROOT = Path(__file__).resolve().parents[2]
STOP_AT = Path(__file__).with_name("stop_at.py")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _kill_at(stop: list[str], cli: list[str], cwd: Path) -> str:
    """Run the CLI until it reaches `stop`, SIGKILL it there; returns its output so far."""
    log = cwd / "victim.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(STOP_AT), *stop, "--", *cli], cwd=cwd, env=ENV,
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"the process ended before the stop point: {log.read_text()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return log.read_text(errors="replace")


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lib_lora", *args], cwd=cwd, env=ENV, capture_output=True, text=True)


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TMP_MARK in p.name]


# ---------------------------------------------------------------- the LoRA and its card files


def _train_args(tmp: Path, ds: Path, name: str, *extra: str) -> list[str]:
    return ["train", str(ds), "--name", name, "--base-model", "tiny", "--output-dir", str(tmp / "out"),
            "--run-dir", str(tmp / "runs" / name), "--resolution", "64", "--min-bucket-reso", "64",
            "--max-bucket-reso", "128", "--dim", "4", "--alpha", "2", "--optimizer", "adamw", "--lr", "1e-3",
            "--max-steps", "3", "--device", "cpu", "--log-every-n-steps", "1", *extra]  # fmt: skip


@pytest.mark.parametrize("existing", ["mine.json", "mine.preview.png", "mine.pt", "mine.ckpt"])
def test_card_files_beside_another_lora_are_not_replaced(tmp_path, capsys, existing):
    """The LoRA, its card `.json` and `.preview.png` (and a LoRA of another format the WebUI
    lists under the same name) are one unit: any of them there refuses the name before training."""
    ds = make_dataset(tmp_path / "data", n=1)
    out = tmp_path / "out"
    out.mkdir()
    mine = out / existing
    mine.write_bytes(b'{"notes": "my own notes"}' if existing.endswith(".json") else b"the user's file")
    before = mine.read_bytes()
    rc = main(_train_args(tmp_path, ds, "mine"))
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "already exists" in lines[0], err
    assert existing in lines[0] and "--overwrite" in lines[0]
    assert mine.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [existing]
    assert not (tmp_path / "runs" / "mine").exists()  # refused up front: nothing was started


def test_overwrite_replaces_the_whole_unit(tmp_path, capsys):
    ds = make_dataset(tmp_path / "data", n=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.json").write_text('{"notes": "old card"}', encoding="utf-8")
    rc = main(_train_args(tmp_path, ds, "mine", "--overwrite"))
    assert rc == 0, capsys.readouterr().err
    card = json.loads((out / "mine.json").read_text(encoding="utf-8"))
    assert card["activation text"] and "old card" not in json.dumps(card)
    assert (out / "mine.safetensors").is_file()


@pytest.mark.parametrize("point", [("lib_lora.training.card", "write_card"), ("lib_lora.training.state", "finish")],
                         ids=["before-card", "before-state-cleanup"])
def test_kill_9_after_the_final_rename_is_completed_by_the_same_command(tmp_path, point):
    """Killed once the final LoRA is renamed into place (before its card, or before the state's
    clean-up): the same command writes what is missing, removes the state and exits 0, without
    training again; it never refuses the file it wrote itself."""
    ds = make_dataset(tmp_path / "data", n=1)
    name = "unit"
    args = _train_args(tmp_path, ds, name, "--sample-images", "1", "--sample-steps", "2")
    out, run_dir = tmp_path / "out", tmp_path / "runs" / name
    _kill_at(["call", *point], args, tmp_path)
    lora = out / f"{name}.safetensors"
    assert lora.is_file()
    lora_sha = sha(lora)
    if point[1] == "write_card":
        assert not (out / f"{name}.json").exists()
    # The state stays until the export is complete: it is what tells the re-run this is its LoRA.
    assert state_path(run_dir).is_file()

    res = _cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already written by this run" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "Training" not in res.stderr  # no second training
    assert sha(lora) == lora_sha
    card = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
    assert card["activation text"] == read_metadata(lora)["ss_output_name"] == name
    with Image.open(out / f"{name}.preview.png") as im:
        im.load()
    assert not state_path(run_dir).exists()
    assert _temps(out) == [] and _temps(run_dir) == []

    # Done now: the same command again is the usual refusal of an existing LoRA.
    again = _cli(args, tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_a_lora_not_written_by_this_run_is_still_refused(tmp_path):
    """The completion needs proof (the state's session id in the LoRA's header): another file of
    that name, even with this run's finished state beside it, is refused and kept."""
    import torch

    from lib_lora.training.export import write_lora

    ds = make_dataset(tmp_path / "data", n=1)
    args = _train_args(tmp_path, ds, "other")
    out, run_dir = tmp_path / "out", tmp_path / "runs" / "other"
    _kill_at(["call", "lib_lora.training.card", "write_card"], args, tmp_path)
    lora = out / "other.safetensors"
    lora.unlink()  # the user puts another LoRA of that name there
    write_lora(lora, {"x.lora_down.weight": torch.zeros(2, 2)}, {"ss_session_id": "someone-else"})
    before = sha(lora)
    res = _cli(args, tmp_path)
    assert res.returncode == 2 and "already exists" in res.stderr, res.stderr[-2000:]
    assert sha(lora) == before and state_path(run_dir).is_file()


# ---------------------------------------------------------------- undo / redo / edits


N_CAPTIONS = 500
DONE_BEFORE_KILL = 28  # as in the report: 28 of 500 files moved, 472 not


def _caption_folder(root: Path) -> Path:
    d = root / "10_cap"
    d.mkdir(parents=True)
    png = root / "px.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    data = png.read_bytes()
    for i in range(N_CAPTIONS):
        (d / f"img{i:03d}.png").write_bytes(data)
        (d / f"img{i:03d}.txt").write_text(f"cap, tag{i % 7}", encoding="utf-8")
    return d


def _captions(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.txt"))}


@pytest.mark.parametrize("op", ["undo", "redo", "add"])
def test_kill_9_during_undo_redo_or_an_edit(tmp_path, op):
    """SIGKILL with 28 of 500 caption files moved: the next open finishes the undo or redo (or
    rolls the edit back), says so, and every caption is wholly the before or the after state,
    the same for all, with the history agreeing."""
    d = _caption_folder(tmp_path)
    original = _captions(d)
    if op in ("undo", "redo"):
        assert main(["tags", str(d), "--add", "extra"]) == 0
        edited = _captions(d)
        assert all(b"extra" in v for v in edited.values())
    if op == "redo":
        assert main(["tags", str(d), "--undo"]) == 0
        assert _captions(d) == original
    cli = {"undo": ["tags", str(d), "--undo"], "redo": ["tags", str(d), "--redo"],
           "add": ["tags", str(d), "--add", "extra"]}[op]
    _kill_at(["rename", ".txt", str(DONE_BEFORE_KILL)], cli, tmp_path)
    now = _captions(d)
    # The kill really landed mid-operation: some files moved, the rest not.
    moved = sum(now[k] != (edited if op == "undo" else original)[k] for k in now)
    assert moved == DONE_BEFORE_KILL, moved

    res = _cli(["tags", str(d), "--history"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    expected = edited if op == "redo" else original
    after = _captions(d)
    assert after == expected, sum(after[k] != expected[k] for k in after)
    word = {"undo": "undo", "redo": "redo", "add": "edit"}[op]
    assert f"The {word} of" in res.stdout or f"The {word} " in res.stdout, res.stdout
    assert "interrupted" in res.stdout and "add extra" in res.stdout
    rows = [ln.split() for ln in res.stdout.splitlines() if ln.strip()[:1].isdigit()]
    if op == "add":
        assert rows == []  # rolled back: never recorded as done
    else:
        assert [r[:2] for r in rows] == [["1", "undone" if op == "undo" else "applied"]], res.stdout
    assert _temps(d) == []
    # Nothing is pending any more: opening again says nothing and changes nothing.
    res2 = _cli(["tags", str(d), "--history"], tmp_path)
    assert "interrupted" not in res2.stdout and _captions(d) == expected


# ---------------------------------------------------------------- prepare


def test_kill_9_during_prepare_then_the_next_prepare_removes_its_temporary_files(tmp_path, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(src / f"p{i}.png")
    work = tmp_path / "work"
    args = ["prepare", str(src), "--name", "set", "--out", str(work), "--size", "64", "--crop", "center",
            "--workers", "1"]
    _kill_at(["rename", ".png", "2"], args, tmp_path)  # two images done, the third written, not renamed
    left = _temps(work)
    assert left, "the kill left no temporary file: it did not land mid-write"

    # Another process's write in progress is left alone (its pid is alive).
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = work / "set" / f".x.png{TMP_MARK}{live.pid}-abcd1234"
        theirs.write_bytes(b"in progress")
        assert main(args) == 0
        out = capsys.readouterr().out
        assert _temps(work) == [theirs], _temps(work)
        assert f"Removed {len(left)} temporary file(s) left by an interrupted run." in out, out
    finally:
        live.kill()
        live.wait()
    assert len(list((work / "set").glob("*_set/*.png"))) == 4
