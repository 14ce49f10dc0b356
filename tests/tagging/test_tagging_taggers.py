"""Both ONNX taggers through their real code paths, on tiny committed models with known outputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from lib_lora.errors import ModelLoadError, UserError
from lib_lora.tagging import taggers
from lib_lora.tagging.tagtext import is_kaomoji, tag_from_model

from .conftest import TAGGERS


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


RED, WHITE, BLUE = (255, 0, 0), (255, 255, 255), (0, 0, 255)


def test_deepdanbooru_through_the_library(dd_dir: Path) -> None:
    t = taggers.load_tagger("deepdanbooru", dd_dir, threshold=0.5, device="cpu", batch_size=2)
    assert t.name == "deepdanbooru"
    # The real library object does the loading.
    from deepdanbooru_onnx import DeepDanbooru

    assert isinstance(t.model, DeepDanbooru)
    out = t.tag_images([Image.new("RGB", (300, 200), RED), Image.new("RGB", (64, 64), WHITE),
                        Image.new("RGB", (10, 10), BLUE)])
    assert len(out) == 3
    red, white, blue = out
    assert set(red) == {"1girl", "long_hair", "red_theme", "lips", "rating:safe"}
    assert red["red_theme"] == pytest.approx(sig(6), abs=1e-5)
    assert red["lips"] == pytest.approx(sig(2), abs=1e-5)
    assert white["white_background"] == pytest.approx(sig(3), abs=1e-5)
    assert white["simple_background"] == pytest.approx(sig(1), abs=1e-5)
    assert "blue_theme" in blue and "red_theme" not in blue
    assert all(s >= 0.5 for d in out for s in d.values())


def test_deepdanbooru_matches_library_call(dd_dir: Path) -> None:
    """Our batched path gives what the library's own single-image call gives."""
    t = taggers.load_tagger("deepdanbooru", dd_dir, threshold=0.05, device="cpu")
    img = Image.new("RGB", (128, 96), (200, 50, 120))
    ours = t.tag_images([img])[0]
    theirs = t.model(img)
    assert ours.keys() == theirs.keys()
    assert all(ours[k] == pytest.approx(float(theirs[k]), abs=1e-6) for k in ours)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_wd14_known_outputs(version: str) -> None:
    t = taggers.load_tagger("wd14", TAGGERS / f"wd14_{version}", threshold=0.3, device="cpu", batch_size=4)
    assert t.name == "wd14"
    assert t.batch_size == (1 if version == "v2" else 4)  # v2 exports fix the batch at 1
    red_square, red_wide, clear = t.tag_images([
        Image.new("RGB", (448, 448), RED),
        Image.new("RGB", (448, 224), RED),           # padded top and bottom with white
        Image.new("RGBA", (100, 100), (0, 0, 255, 0)),  # fully transparent: composited on white
    ])
    # Channel order: the model reads BGR, so pure red lights `red_theme`, not `blue_theme`.
    assert red_square["red_theme"] == pytest.approx(sig(6), abs=1e-4)
    assert "blue_theme" not in red_square
    # Padding is white: half the picture is white, so the mean B and G are 127.5.
    assert red_wide["red_theme"] == pytest.approx(sig(8 - 4 * 0.5 - 4 * 0.5 - 2), abs=0.02)
    # float32 ReduceMean over 448x448 values of 255 drifts a little (more with a fixed batch of 1)
    assert clear["white_background"] == pytest.approx(sig(3), abs=5e-3)
    assert "red_theme" not in clear and "blue_theme" not in clear
    assert t.category("hatsune_miku") == "character"
    assert t.category("general") == "rating"
    assert t.category("1girl") == "general"


def test_wd14_hub_id_without_network_names_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(taggers, "WD14_CACHE", tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="model.onnx and selected_tags.csv"):
        taggers.load_tagger("wd14", "SmilingWolf/wd-vit-tagger-v3")
    # A file already in our cache folder is used.
    folder = tmp_path / "SmilingWolf--wd-vit-tagger-v3"
    folder.mkdir()
    for name in ("model.onnx", "selected_tags.csv"):
        (folder / name).write_bytes((TAGGERS / "wd14_v3" / name).read_bytes())
    assert taggers.load_tagger("wd14", "SmilingWolf/wd-vit-tagger-v3").name == "wd14"


def test_deepdanbooru_missing_model_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(taggers, "DEEPDANBOORU_HOME", tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        taggers.load_tagger("deepdanbooru")
    msg = str(err.value)
    assert "deepdanbooru.onnx" in msg and "tags.txt" in msg and str(tmp_path / "cache") in msg
    with pytest.raises(ModelLoadError, match="Not found"):
        taggers.load_tagger("deepdanbooru", tmp_path / "nope.onnx")
    assert not (tmp_path / "cache").exists()  # nothing created when offline


def test_deepdanbooru_cache_folder_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dd_dir: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("deepdanbooru.onnx", "tags.txt"):
        (cache / name).write_bytes((dd_dir / name).read_bytes())
    monkeypatch.setattr(taggers, "DEEPDANBOORU_HOME", cache)
    t = taggers.load_tagger("deepdanbooru", threshold=0.9)
    assert set(t.tag_images([Image.new("RGB", (8, 8), RED)])[0]) == {"1girl", "red_theme"}


def test_mismatched_tag_list_is_refused(tmp_path: Path, dd_dir: Path) -> None:
    short = tmp_path / "tags.txt"
    short.write_text("1girl\nsolo\n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="lists 2 tags but the model scores 12"):
        taggers.load_tagger("deepdanbooru", dd_dir / "deepdanbooru.onnx", short)
    bad_csv = tmp_path / "selected_tags.csv"
    bad_csv.write_text("id;name\n1;x\n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="selected_tags.csv"):
        taggers.load_tagger("wd14", TAGGERS / "wd14_v3" / "model.onnx", bad_csv)


def test_unknown_kinds_and_thresholds(dd_dir: Path) -> None:
    with pytest.raises(UserError, match="Unknown tagger"):
        taggers.load_tagger("clip")
    with pytest.raises(UserError, match="only available inside the WebUI"):
        taggers.load_tagger("webui")
    with pytest.raises(UserError, match="between 0 and 1"):
        taggers.load_tagger("deepdanbooru", dd_dir, threshold=2)


def test_underscores_and_kaomoji() -> None:
    assert tag_from_model("long_hair") == "long hair"
    assert tag_from_model("hand_on_own_cheek") == "hand on own cheek"
    for face in ("^_^", ">_<", "o_o", "0_0", "+_+", "x_x", "=_=", "@_@"):
        assert is_kaomoji(face) and tag_from_model(face) == face
    assert tag_from_model("long_hair", keep_underscores=True) == "long_hair"
    assert not is_kaomoji("a_b_c_long")
