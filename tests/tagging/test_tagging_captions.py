"""Step 3 end to end: tag a folder with the tiny DeepDanbooru/WD14 models, captions and scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lib_lora.config import TagConfig, validate
from lib_lora.errors import Cancelled, DatasetError
from lib_lora.progress import NullProgress
from lib_lora.tagging.captions import (
    background_from_manifest,
    caption_from_scores,
    image_dirs,
    recaption,
    tag_dataset,
)
from lib_lora.tagging.session import STATE_DIR, EditSession
from lib_lora.tagging.taggers import load_tagger

from .conftest import TAGGERS

RED, WHITE = (255, 0, 0), (255, 255, 255)


class Recorder(NullProgress):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    def update(self, done: int, total: int, text: str = "") -> None:
        self.calls.append((done, total))


def test_tag_folder_with_deepdanbooru(make_images, dd_dir: Path) -> None:
    d = make_images({"a.png": RED, "b.png": WHITE, "c.jpg": RED})
    tagger = load_tagger("deepdanbooru", dd_dir, threshold=0.05, batch_size=2)
    progress = Recorder()
    report = tag_dataset(d, tagger, validate(TagConfig(batch_size=2)), progress)
    assert report.tagged == 3 and report.captions_written == 3 and report.trigger == "Zhang"
    # Score order, threshold 0.5, underscores gone, ratings out, the trigger (folder name) first.
    assert (d / "a.txt").read_text(encoding="utf-8") == "Zhang, red theme, 1girl, lips, long hair"
    assert (d / "b.txt").read_text(encoding="utf-8") == (
        "Zhang, 1girl, white background, lips, simple background, long hair")
    scores = json.loads((d / STATE_DIR / "scores.json").read_text(encoding="utf-8"))
    assert scores["tagger"] == "deepdanbooru"
    a = scores["images"]["a.png"]["scores"]
    assert a["^_^"] == pytest.approx(0.26894, abs=1e-4) and "rating:safe" in a
    assert scores["images"]["a.png"]["categories"]["rating:safe"] == "rating"
    assert progress.calls[-1] == (3, 3)
    # Tagging is one undoable step: undo removes the new captions again.
    assert EditSession(d).undo() == "tag with deepdanbooru"
    assert not (d / "a.txt").exists()


def test_recaption_from_scores_needs_no_tagger(make_images, dd_dir: Path) -> None:
    d = make_images({"a.png": RED})
    tag_dataset(d, load_tagger("deepdanbooru", dd_dir), validate(TagConfig()))
    cfg = validate(TagConfig(general_threshold=0.2, sort="alphabetical", trigger="zz"))
    report = recaption(d, cfg)
    assert report.captions_written == 1
    assert (d / "a.txt").read_text(encoding="utf-8") == "zz, 1girl, ^_^, lips, long hair, red theme"


def test_background_from_manifest(make_images, dd_dir: Path) -> None:
    d = make_images({"a.png": WHITE})
    (d.parent / "manifest.json").write_text(json.dumps({"background": {"removed": True, "color": [128, 128, 128]}}))
    report = tag_dataset(d, load_tagger("deepdanbooru", dd_dir), validate(TagConfig(trigger="T")))
    assert report.background == "simple background, grey background"
    tags = (d / "a.txt").read_text(encoding="utf-8").split(", ")
    assert tags[0] == "T" and "white background" not in tags
    assert tags[-2:] == ["simple background", "grey background"]


def test_background_from_manifest_helper() -> None:
    assert background_from_manifest({}) is None
    assert background_from_manifest({"background": {"removed": False}}) is None
    removed = {"background": {"removed": True}}
    assert background_from_manifest(removed) == ["simple background", "white background"]
    for kept_transparent in ("transparent", "none", None):
        manifest = {"background": {"removed": True, "color": kept_transparent}}
        assert background_from_manifest(manifest) == ["simple background", "transparent background"]
    # A colour nobody can parse (a hand-edited manifest) names no colour rather than guessing white.
    unparseable = {"background": {"removed": True, "color": "mauve-ish"}}
    assert background_from_manifest(unparseable) == ["simple background"]


# Spellings prepare's bg_color accepts, by the word a Danbooru tagger uses for that colour.
COLOUR_SPELLINGS = {
    "black": ["#000", "#000000", "black", "rgb(0,0,0)", "hsl(0,0%,0%)", "rgb(10,0,0)"],
    "blue": ["navy", "#00f", "skyblue"],
    "white": ["white", "#FAFAFA", "#fff"],
    "grey": ["gray", "Grey", "#808080", "silver", [128, 128, 128]],
    "red": ["red", "#c00", "maroon"],
    "green": ["green", "lime"],
    "yellow": ["yellow", "gold"],
    "pink": ["pink", "lightpink", "deeppink"],
    "purple": ["purple", "indigo"],
    "orange": ["orange"],
    "brown": ["brown", "saddlebrown", "tan"],
}


@pytest.mark.parametrize(
    ("colour", "word"),
    [(colour, word) for word, spellings in COLOUR_SPELLINGS.items() for colour in spellings],
)
def test_background_colour_spellings(colour, word) -> None:
    from lib_lora.dataset.background import parse_color

    if isinstance(colour, str):
        parse_color(colour)  # a spelling prepare accepts
    manifest = {"background": {"removed": True, "color": colour}}
    assert background_from_manifest(manifest) == ["simple background", f"{word} background"]


def test_wd14_thresholds_and_ratings(make_images) -> None:
    d = make_images({"a.png": RED}, folder="plain")
    tagger = load_tagger("wd14", TAGGERS / "wd14_v3", threshold=0.05)
    tag_dataset(d, tagger, validate(TagConfig(tagger="wd14")))
    tags = (d / "a.txt").read_text(encoding="utf-8").split(", ")
    # general >= 0.35 (solo 0.5, ^_^ 0.45 kept as a kaomoji), character >= 0.85 (marisa yes, miku 0.73 no),
    # no rating tags, and no trigger: a plain folder has no LoRA name.
    # (1girl and kirisame marisa both score sigmoid(3): their order is float noise.)
    assert tags[0] == "red theme" and tags[3:] == ["solo", "^_^"]
    assert set(tags[1:3]) == {"1girl", "kirisame marisa"}


def test_existing_captions_skip_merge_and_bad_files(make_images, dd_dir: Path) -> None:
    d = make_images({"a.png": RED, "b.png": RED, "c.png": RED})
    (d / "a.txt").write_text("my own, words", encoding="utf-8")
    (d / "c.txt").write_bytes(b"\xff\xfe\x00bad")
    (d / "d.png").write_bytes(b"not an image at all")
    tagger = load_tagger("deepdanbooru", dd_dir)
    report = tag_dataset(d, tagger, validate(TagConfig(existing="skip", max_tags=2)))
    assert (d / "a.txt").read_text(encoding="utf-8") == "my own, words"
    assert (d / "b.txt").read_text(encoding="utf-8") == "Zhang, red theme, 1girl"
    assert (d / "c.txt").read_bytes() == b"\xff\xfe\x00bad"
    assert any("c.txt" in p for p in report.problems) and any("d.png" in p for p in report.problems)
    tag_dataset(d, tagger, validate(TagConfig(existing="merge", max_tags=1)))
    assert (d / "a.txt").read_text(encoding="utf-8") == "Zhang, my own, words, red theme"


def test_cancel(make_images, dd_dir: Path) -> None:
    d = make_images({"a.png": RED})
    p = NullProgress()
    p.cancel()
    with pytest.raises(Cancelled):
        tag_dataset(d, load_tagger("deepdanbooru", dd_dir), validate(TagConfig()), p)
    assert not (d / "a.txt").exists()


def test_caption_from_scores_pure() -> None:
    cfg = validate(TagConfig(general_threshold=0.5))
    scores = {"b_tag": 0.9, "a_tag": 0.6, "low": 0.3, "rating:safe": 0.99, "some_char": 0.8}
    assert caption_from_scores(scores, {"some_char": "character"}, cfg) == ["b tag", "a tag"]
    # Without categories a character tag counts as general; `rating:` tags never enter a caption.
    assert caption_from_scores(scores, {}, cfg, trigger="t") == ["t", "b tag", "some char", "a tag"]


def test_dataset_folders(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        image_dirs(tmp_path)
    for sub in ("10_a", "5_b"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / sub / "x.png")
    assert [p.name for p in image_dirs(tmp_path)] == ["10_a", "5_b"]


def test_dataset_folders_skip_masks(tmp_path: Path) -> None:
    for sub in ("10_x", "masks"):
        (tmp_path / sub).mkdir()
        Image.new("RGBA", (4, 4)).save(tmp_path / sub / "a.png")
    assert image_dirs(tmp_path) == [tmp_path / "10_x"]


def test_tagger_sees_images_upright(tmp_path: Path) -> None:
    """A phone photo stored sideways with EXIF Orientation=6 reaches the tagger as the user sees it."""
    from lib_lora.tagging.captions import load_for_tagging

    stored = Image.new("RGB", (60, 40), RED)
    stored.paste(Image.new("RGB", (60, 20), (0, 0, 255)), (0, 20))  # bottom half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    seen = load_for_tagging(tmp_path / "phone.jpg")
    assert seen.size == (40, 60)
    # Turned clockwise, the stored bottom (blue) is on the left, the stored top (red) on the right.
    left, right = seen.getpixel((5, 30)), seen.getpixel((35, 30))
    assert left[2] > 200 and left[0] < 60 and right[0] > 200 and right[2] < 60
    assert isinstance(load_for_tagging(tmp_path / "missing.png"), str)  # a reason, not an exception


def test_transparent_png_is_tagged_on_white(make_images, dd_dir: Path) -> None:
    """A cut-out saved with transparency: the tagger sees white behind it, not the black of its RGB channels."""
    d = make_images({})
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(d / "cutout.png")
    tag_dataset(d, load_tagger("deepdanbooru", dd_dir), validate(TagConfig(trigger="T")))
    # The tiny DeepDanbooru model scores white_background sigmoid(3) on white, ~0 on black.
    assert "white background" in (d / "cutout.txt").read_text(encoding="utf-8").split(", ")


def test_tagger_floor_never_hides_a_tag_a_threshold_asks_for() -> None:
    assert TagConfig().tagger_floor() == 0.05  # the sidecar's floor, below every threshold
    assert TagConfig(score_floor=0.6, general_threshold=0.3).tagger_floor() == 0.3
    assert TagConfig(tagger="wd14", score_floor=0.9, character_threshold=0.2).tagger_floor() == 0.2


def test_tagger_trainer_and_ui_see_the_same_images(make_images, dd_dir: Path) -> None:
    """One list of image extensions: an image the tagger captions is one the trainer trains on and the UI shows."""
    from lib_lora.config import TrainConfig
    from lib_lora.training.data import scan_dataset
    from lib_lora.ui.captions_view import caption_rows

    d = make_images({"a.png": RED, "b.jpe": RED, "c.gif": RED, "d.tif": RED, "e.webp": RED, "f.JPG": RED})
    Image.new("RGB", (64, 64), RED).save(d / ".hidden.png")  # e.g. a file manager's thumbnail: not data
    (d / "folder.png").mkdir()
    (d / "notes.md").write_text("not an image", encoding="utf-8")
    expected = ["a.png", "b.jpe", "c.gif", "d.tif", "e.webp", "f.JPG"]

    report = tag_dataset(d, load_tagger("deepdanbooru", dd_dir), validate(TagConfig()))
    assert report.tagged == len(expected) and not report.problems
    trained = [item.path.name for item in scan_dataset(d.parent, TrainConfig(resolution=64)).items]
    assert sorted(trained) == expected
    assert [name for name, _ in caption_rows(d)] == expected
