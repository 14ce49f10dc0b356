"""`python -m lib_lora tag` and `tags`: the commands the issue names, through lib_lora.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

from lib_lora.cli import main
from lib_lora.tagging.translate import load_translations

from .conftest import FIXTURES, TAGGERS

EXAMPLE = json.loads((FIXTURES / "tag_edit_example.json").read_text(encoding="utf-8"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_tag_then_rules_then_undo(make_images, capsys) -> None:
    d = make_images({"a.png": (255, 0, 0), "b.png": (255, 255, 255)}, folder="30_ZhangNaYing")
    root = d.parent
    dd = TAGGERS / "deepdanbooru"
    assert main(["tag", str(root), "--tagger", "deepdanbooru", "--model", str(dd / "deepdanbooru.onnx"),
                 "--tags", str(dd / "tags.txt"), "--threshold", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 images tagged with deepdanbooru" in out
    assert (d / "a.txt").read_text(encoding="utf-8").startswith("ZhangNaYing, red theme")

    # The tutorial's example caption on a third image.
    (d / "c.png").write_bytes((d / "a.png").read_bytes())
    (d / "c.txt").write_text(", ".join(EXAMPLE["auto"]), encoding="utf-8")
    before = snapshot(d)
    assert main(["tags", str(root), "--preset", "person", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "-lips (intrinsic" in out and "-hat (implied by 'baseball cap')" in out
    assert "preset person: 3 of 3 captions change" in out and "dry run" in out
    assert snapshot(d) == before

    assert main(["tags", str(root), "--preset", "person"]) == 0
    c = (d / "c.txt").read_text(encoding="utf-8").split(", ")
    assert c[0] == "ZhangNaYing" and not set(EXAMPLE["rules_must_remove"]) & set(c)
    assert set(EXAMPLE["rules_must_keep"]) <= set(c)
    assert main(["tags", str(root), "--undo"]) == 0
    assert snapshot(d) == before
    assert main(["tags", str(root), "--redo"]) == 0
    assert main(["tags", str(root), "--history"]) == 0
    assert main(["tags", str(root), "--frequencies"]) == 0
    out = capsys.readouterr().out
    assert "preset person" in out and "1girl (1个女孩)" in out


def test_missing_model_is_one_clear_line(make_images, capsys, tmp_path: Path) -> None:
    d = make_images({"a.png": (1, 2, 3)})
    assert main(["tag", str(d), "--tagger", "wd14", "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The WD14 tagger is missing") and err.count("\n") == 1


def test_translations_cover_common_tags() -> None:
    tr = load_translations()
    assert len(tr.to_zh) >= 1000
    assert tr.display("long hair") == "long hair (长发)"
    assert tr.to_tag("棒球帽") == "baseball cap"
    assert tr.search("帽", ["baseball cap", "shirt", "hat"]) == ["baseball cap", "hat"]
    assert tr.search("SHIRT", ["white shirt", "skirt"]) == ["white shirt"]


def test_bulk_edits_from_the_cli(make_images, capsys) -> None:
    d = make_images({"a.png": (1, 1, 1), "b.png": (2, 2, 2)}, folder="plain")
    (d / "a.txt").write_text("1girl, hat, smile", encoding="utf-8")
    (d / "b.txt").write_text("1boy, hat", encoding="utf-8")
    before = snapshot(d)
    assert main(["tags", str(d), "--where", "帽子", "--where-not", "1boy", "--add", "straw", "--front", "smile"]) == 0
    assert (d / "a.txt").read_text(encoding="utf-8") == "smile, 1girl, hat, straw"
    assert (d / "b.txt").read_text(encoding="utf-8") == "1boy, hat"
    assert main(["tags", str(d), "--replace", "^(.*)hat$", r"\1cap", "--regex"]) == 0
    assert (d / "b.txt").read_text(encoding="utf-8") == "1boy, cap"
    for _ in range(3):
        assert main(["tags", str(d), "--undo"]) == 0
    assert snapshot(d) == before
    assert "1 of 2 images match the filter" in capsys.readouterr().out


def test_from_scores_rethresholds_without_the_model(make_images) -> None:
    d = make_images({"a.png": (255, 0, 0)}, folder="4_Zed")
    dd = TAGGERS / "deepdanbooru"
    assert main(["tag", str(d), "--model", str(dd)]) == 0
    assert (d / "a.txt").read_text(encoding="utf-8") == "Zed, red theme, 1girl, lips, long hair"
    # The model is not needed any more: a lower threshold and another order from the saved scores.
    assert main(["tag", str(d), "--model", "/nowhere", "--from-scores", "--threshold", "0.2", "--sort", "alphabetical"]) == 0
    assert (d / "a.txt").read_text(encoding="utf-8") == "Zed, 1girl, ^_^, lips, long hair, red theme"
