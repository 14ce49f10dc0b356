"""Adjusting one crop (the UI's path) and the `prepare` command."""

from __future__ import annotations

import json

import pytest

from lib_lora.cli import main
from lib_lora.config import PrepareConfig
from lib_lora.dataset.manifest import read_manifest
from lib_lora.dataset.prepare import load_report, prepare_dataset, reprocess_image
from lib_lora.errors import UserError


@pytest.fixture()
def prepared(tmp_path, grace_hopper):
    src = tmp_path / "src"
    src.mkdir()
    grace_hopper.save(src / "hopper.jpg", quality=95)
    return src, prepare_dataset(src, PrepareConfig(name="gh", out=str(tmp_path / "w"), workers=1))


def test_reprocess_with_user_box_and_rerun_keeps_it(prepared, tmp_path):
    src, report = prepared
    before = report.items[0]
    rec = reprocess_image(report.train_dir, before.source, (10, 40, 410, 440))
    assert rec.crop_box == (10, 40, 410, 440) and rec.crop_mode == "manual"
    assert rec.output == before.output and rec.output_size == (400, 400)  # not upscaled
    assert rec.output_sha256 != before.output_sha256
    item = read_manifest(report.train_dir)["items"][0]
    assert item["crop_box"] == [10, 40, 410, 440] and item["crop_mode"] == "manual"
    loaded = load_report(report.train_dir)  # what the UI shows after a restart
    assert loaded.items[0].crop_box == (10, 40, 410, 440) and loaded.items[0].output == before.output
    assert loaded.image_dir == report.image_dir
    again = prepare_dataset(src, PrepareConfig(name="gh", out=str(tmp_path / "w"), workers=1))
    assert again.items[0].unchanged and again.items[0].crop_box == (10, 40, 410, 440)
    bigger = prepare_dataset(src, PrepareConfig(name="gh", out=str(tmp_path / "w"), workers=1, size=256))
    assert bigger.items[0].crop_box == (10, 40, 410, 440) and bigger.items[0].output_size == (256, 256)


def test_reprocess_rejects_unknown_source_and_bad_box(prepared, tmp_path):
    _, report = prepared
    with pytest.raises(UserError, match="not part of the dataset"):
        reprocess_image(report.train_dir, tmp_path / "other.jpg", (0, 0, 10, 10))
    with pytest.raises(UserError, match="outside"):
        reprocess_image(report.train_dir, report.items[0].source, (5000, 5000, 6000, 6000))


def test_cli_prepare_prints_summary(prepared, tmp_path, capsys):
    src, _ = prepared
    rc = main(["prepare", str(src), "--name", "cli 名前", "--out", str(tmp_path / "cli"), "--crop", "center",
               "--repeats", "30", "--workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Kept 1 of 1" in out and "Train on:" in out
    assert "Faces found" not in out  # centre crops look for no faces
    assert (tmp_path / "cli" / "cli 名前" / "30_cli 名前" / "hopper.png").is_file()
    manifest = json.loads((tmp_path / "cli" / "cli 名前" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["crop"] == "center" and manifest["config"]["repeats"] == 30


def test_cli_errors_are_one_line(tmp_path, capsys):
    rc = main(["prepare", str(tmp_path / "nope"), "--name", "x", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: The source folder") and err.count("\n") == 1
    rc = main(["prepare", str(tmp_path), "--name", "../escape", "--out", str(tmp_path)])
    assert rc == 2 and "dataset name" in capsys.readouterr().err


def test_spawned_workers_and_progress(tmp_path, monkeypatch, pattern):
    """Where there is no forkserver (Windows, macOS) workers are spawned: that path works too."""
    import multiprocessing

    from PIL import Image

    from lib_lora.dataset import prepare as prepare_mod

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.fromarray(pattern(100 + i)).save(src / f"p{i}.png")
    monkeypatch.setattr(prepare_mod, "_mp_context", lambda: multiprocessing.get_context("spawn"))

    class Recorder:
        def __init__(self):
            self.seen = []

        def update(self, done, total, text=""):
            self.seen.append((done, total))

        def cancelled(self):
            return False

    progress = Recorder()
    report = prepare_dataset(src, PrepareConfig(name="sp", out=str(tmp_path / "w"), crop="center", workers=2),
                             progress)
    assert len(report.kept) == 3
    assert progress.seen[0] == (0, 3) and progress.seen[-1] == (3, 3)


def test_workers_that_cannot_start_fall_back_to_this_process(tmp_path, monkeypatch, pattern, caplog):
    import os

    from PIL import Image

    from lib_lora.dataset import prepare as prepare_mod

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.fromarray(pattern(200 + i)).save(src / f"p{i}.png")
    monkeypatch.setattr(prepare_mod, "init_worker", os._exit)  # every worker dies as it starts
    report = prepare_dataset(src, PrepareConfig(name="fb", out=str(tmp_path / "w"), crop="center", workers=2))
    assert len(report.kept) == 3 and all(r.status == "ok" for r in report.items)
    assert "failed to start" in caplog.text
