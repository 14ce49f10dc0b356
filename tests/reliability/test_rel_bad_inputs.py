"""The bad-input corpus, end to end through the CLI: every bad file or caption is reported
once, the run goes on with the rest, and the source files are byte-identical afterwards.

The corpus has two kinds of entries: files that must be skipped with a message (unreadable
images, captions that are not text) and odd-but-valid inputs that must simply train."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers_rel import tree_digest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _png(size=(64, 64), mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(size=(64, 64), mode="RGB", exif_rotate=False) -> bytes:
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6
        im.save(buf, format="JPEG", exif=exif)
    else:
        im.save(buf, format="JPEG")
    return buf.getvalue()


def build_corpus(folder: Path) -> tuple[list[str], list[str]]:
    """Write the corpus; returns (files that must be skipped, odd files that must train)."""
    folder.mkdir(parents=True)
    good = _png()
    skip: dict[str, bytes] = {
        "empty.png": b"",
        "random_bytes.png": os.urandom(3000),
        "truncated.png": good[: len(good) // 2],
        "text_as.jpg": b"this is not a picture\n" * 20,
        "png_header_garbage.png": good[:16] + os.urandom(500),
        "truncated.jpg": _jpeg()[:300],
        "tiny_1x1.png": _png((1, 1)),
        "html_as.webp": b"<html><body>hi</body></html>",
    }
    # Images whose caption is not usable text: the pair is skipped with a message.
    bad_captions = {
        "cap_binary": os.urandom(200),
        "cap_latin1": "café, crème".encode("latin-1"),
        "cap_utf16": "1girl, smile".encode("utf-16"),
    }
    ok: dict[str, bytes] = {
        "grey16.png": _png(mode="I"),
        "cmyk.jpg": _jpeg(mode="CMYK"),
        "rgba.png": _png(mode="RGBA"),
        "palette.png": _png(mode="P"),
        "rotated_exif.jpg": _jpeg((64, 64), exif_rotate=True),  # square: the 64 px test buckets
        "名前 with spaces.png": _png(seed=3),
        "UPPER.PNG": _png(seed=4),
    }
    odd_captions = {
        "cap_empty": b"",
        "cap_100k": ("tag, " * 20000).encode(),
        "cap_commas": b",,,,,,,,,,,,",
        "cap_bom": "\ufeff1girl, smile".encode(),
        "cap_nul": b"1girl\x00, smile",
        "cap_whitespace": b"   \n\n\t\n",
        "cap_emphasis": b"(masterpiece:1.4), [bad], {x}, <lora:a:1>",
        "cap_crlf": b"1girl, smile\r\nsecond line ignored\r\n",
    }
    for name, data in {**skip, **ok}.items():
        (folder / name).write_bytes(data)
    for i, (stem, data) in enumerate({**bad_captions, **odd_captions}.items()):
        (folder / f"{stem}.png").write_bytes(_png(seed=10 + i))
        (folder / f"{stem}.txt").write_bytes(data)
    (folder / "a_folder.png").mkdir()  # a folder with an image's name
    (folder / "notes.md").write_text("not an image, not a caption")
    must_skip = sorted([*skip, *(f"{s}.png" for s in bad_captions)])
    must_train = sorted([*ok, *(f"{s}.png" for s in odd_captions)])
    return must_skip, must_train


def _train_cli(dataset: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """`python -m lib_lora train` on the tiny model as a real process: (result, the plan event)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lib_lora", "train", str(dataset), "--name", "corpus", "--base-model", "tiny",
           "--output-dir", str(tmp_path / "out"), "--run-dir", str(run_dir), "--resolution", "64",
           "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--dim", "4", "--optimizer", "adamw",
           "--max-steps", "3", "--device", "cpu", "--log-every-n-steps", "1"]  # fmt: skip
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "out" / "corpus.safetensors").is_file()
    events = [json.loads(ln) for ln in (run_dir / "logs" / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    return res, [e for e in events if e["kind"] == "plan"][-1]


def _tag_cli(folder: Path, capsys) -> list[str]:
    """`python -m lib_lora tag` with the committed DeepDanbooru fixture: its 'problem:' lines."""
    from lib_lora.cli import main

    dd = ROOT / "tests" / "fixtures" / "taggers" / "deepdanbooru"
    rc = main(["tag", str(folder), "--tagger", "deepdanbooru", "--model", str(dd / "deepdanbooru.onnx"),
               "--tags", str(dd / "tags.txt")])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    return [ln for ln in (out.out + out.err).splitlines() if ln.startswith("problem:")]


def test_bad_input_corpus_through_the_cli(tmp_path, capsys):
    src = tmp_path / "photos"
    must_skip, must_train = build_corpus(src / "3_bad")
    assert len(must_skip) + len(must_train) >= 20
    before = tree_digest(src)
    work = tmp_path / "work"
    # The corpus copied as is, without prepare: the harder case for tag and train (nothing was
    # cleaned up). The full prepare -> tag -> train path is the next test.
    shutil.copytree(src, work)

    # Step 3 (tag): bad images and captions are reported, the rest tagged.
    problems = _tag_cli(work, capsys)
    for name in [n for n in must_skip if n != "tiny_1x1.png"]:  # the tagger can read a 1x1 image
        stem = Path(name).stem
        hits = [ln for ln in problems if ln.startswith((f"problem: {name}:", f"problem: {stem}.txt:"))]
        assert len(hits) == 1, (name, problems)

    # Step 6 (train), as a real process.
    res, plan = _train_cli(work, tmp_path)
    skipped = [Path(s["path"]).name for s in plan["skipped"]]
    assert sorted(skipped) == must_skip  # each bad file reported exactly once
    assert plan["images"] == len(must_train)
    for name in must_skip:  # and the user sees it
        assert name in res.stderr, name
    assert "Traceback" not in res.stderr
    assert tree_digest(src) == before  # the user's photos are byte-identical


def test_bad_input_corpus_prepare_tag_train(tmp_path, capsys):
    """Steps 1-2 (prepare), 3 (tag) and 6 (train) through the CLI, as a user runs them."""
    from lib_lora.cli import main

    src = tmp_path / "photos"
    must_skip, must_train = build_corpus(src)
    bad_images = [n for n in must_skip if not n.startswith("cap_")]  # prepare takes images, not captions
    before = tree_digest(src)
    work = tmp_path / "work"

    rc = main(["prepare", str(src), "--name", "corpus", "--out", str(work), "--size", "64", "--crop", "center",
               "--repeats", "2"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    report = out.out
    for name in bad_images:  # each bad image: one line, with its reason
        assert len([ln for ln in report.splitlines() if ln.startswith(f"  {name}: ")]) == 1, (name, report)
    kept = len(must_train) + len(must_skip) - len(bad_images)
    assert f"Kept {kept} of " in report and "Traceback" not in out.err
    image_dir = work / "corpus" / "2_corpus"
    made = sorted(p for p in image_dir.iterdir() if p.suffix == ".png")
    assert len(made) == kept
    for p in made:
        with Image.open(p) as im:
            assert im.size == (64, 64) and im.mode == "RGB", p.name

    assert _tag_cli(work / "corpus", capsys) == []  # prepare let only good images through
    assert all(p.with_suffix(".txt").is_file() for p in made)

    res, plan = _train_cli(work / "corpus", tmp_path)
    assert plan["skipped"] == [] and plan["images"] == kept
    assert "Traceback" not in res.stderr
    assert tree_digest(src) == before  # the user's photos are byte-identical
