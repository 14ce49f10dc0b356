"""Background removal through rembg's real session code, with a tiny ONNX model (fixture)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_lora.config import PrepareConfig
from lib_lora.dataset.background import resolve_model
from lib_lora.dataset.manifest import read_manifest
from lib_lora.dataset.prepare import prepare_dataset
from lib_lora.errors import ModelLoadError, UserError

TINY_BG_MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_bg_model.onnx"


def _green_screen(path, seed=0):
    """A red subject (disc) on a green screen: the tiny model's notion of foreground."""
    yy, xx = np.mgrid[0:700, 0:700]
    arr = np.zeros((700, 700, 3), np.uint8)
    arr[:] = (40, 200, 40)
    disc = (xx - 350) ** 2 + (yy - 380) ** 2 < 200**2
    arr[disc] = (220, 40 + seed, 40)
    Image.fromarray(arr).save(path)


@pytest.fixture()
def src(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    _green_screen(folder / "subject.png")
    return folder


def test_custom_onnx_through_u2net_custom(src, tmp_path):
    report = prepare_dataset(src, PrepareConfig(name="bg", out=str(tmp_path / "w"), crop="center",
                                                remove_bg=str(TINY_BG_MODEL), workers=1))
    rec = report.items[0]
    assert rec.background_removed and rec.background_model == str(TINY_BG_MODEL)
    with Image.open(rec.output) as img:
        assert img.mode == "RGB" and img.size == (512, 512)
        arr = np.asarray(img)
    assert arr[5, 5].min() >= 245  # the green corner is white now
    r, g, b = arr[280, 256]
    assert r > 180 and g < 90 and b < 90  # the red subject is kept
    data = read_manifest(report.train_dir)
    assert data["background"]["removed"] is True and data["background"]["color"] == "white"
    assert data["background"]["tags"] == ["simple background", "white background"]
    assert data["items"][0]["background_model"] == str(TINY_BG_MODEL)
    assert report.bg_removed and "Background: removed" in report.summary()
    # The tagging step reads this manifest from the image folder and sets matching tags.
    from lib_lora.tagging.captions import background_from_manifest
    from lib_lora.tagging.captions import read_manifest as tagging_manifest

    expected = ["simple background", "white background"]
    assert background_from_manifest(tagging_manifest(report.image_dir)) == expected


def test_black_background_is_captioned_black(src, tmp_path):
    """Regression: '#000' failed the tagger's 6-digit colour parsing and was captioned 'white background'."""
    from lib_lora.config import TagConfig, validate
    from lib_lora.tagging.captions import tag_dataset
    from lib_lora.tagging.taggers import load_tagger

    out, model = str(tmp_path / "w"), str(TINY_BG_MODEL)
    cfg = PrepareConfig(name="dark", out=out, crop="center", remove_bg=model, bg_color="#000", workers=1)
    report = prepare_dataset(src, cfg)
    with Image.open(report.items[0].output) as img:
        assert np.asarray(img)[5, 5].max() <= 10  # the green corner is black now
    dd = Path(__file__).resolve().parents[1] / "fixtures" / "taggers" / "deepdanbooru"
    tagged = tag_dataset(report.image_dir, load_tagger("deepdanbooru", dd), validate(TagConfig()))
    assert tagged.background == "simple background, black background"
    tags = report.items[0].output.with_suffix(".txt").read_text(encoding="utf-8").split(", ")
    assert tags[-2:] == ["simple background", "black background"] and "white background" not in tags


def test_grey_background_and_keep_rgba(src, tmp_path):
    cfg = PrepareConfig(name="rgba", out=str(tmp_path / "w"), crop="center", remove_bg=str(TINY_BG_MODEL),
                        bg_color="grey", keep_rgba=True, workers=1)
    rec = prepare_dataset(src, cfg).items[0]
    with Image.open(rec.output) as img:
        assert img.mode == "RGBA"
        arr = np.asarray(img)
    assert abs(int(arr[5, 5, 0]) - 128) <= 3 and arr[5, 5, 3] < 10  # grey, transparent
    assert arr[280, 256, 3] > 245
    assert rec.mask is not None and rec.mask.parent.name == "masks" and rec.mask.is_file()
    assert not list(rec.output.parent.glob("*mask*"))  # masks stay out of the training folder
    # Training and tagging read RGBA on white, so the manifest (and the captions) say white, not grey.
    from lib_lora.dataset.images import load_rgb
    from lib_lora.dataset.manifest import read_manifest

    assert min(load_rgb(rec.output).getpixel((5, 5))) >= 240  # near-white, not grey (128)
    bg = read_manifest(rec.output.parent.parent)["background"]
    assert bg["color"] == "white" and bg["tags"] == ["simple background", "white background"]
    # The trainer, given train_dir, finds exactly the <repeats>_<name> folder (masks/ is not a subset).
    from lib_lora.config import TrainConfig
    from lib_lora.training.data import find_subsets

    subsets = find_subsets(rec.output.parent.parent, TrainConfig())
    assert [(s.folder, s.repeats) for s in subsets] == [(rec.output.parent, 10)]


def test_named_model_from_model_folder(src, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(TINY_BG_MODEL, models / "u2netp.onnx")  # rembg's U2netpSession runs it
    report = prepare_dataset(src, PrepareConfig(name="named", out=str(tmp_path / "w"), crop="center",
                                                remove_bg="u2netp", model_dir=str(models), download=False,
                                                workers=1))
    with Image.open(report.items[0].output) as img:
        assert np.asarray(img)[5, 5].min() >= 245
    assert report.bg_model == "u2netp"


def test_named_model_in_u2net_home(src, tmp_path, monkeypatch):
    home = tmp_path / "u2net_home"
    home.mkdir()
    shutil.copyfile(TINY_BG_MODEL, home / "isnet-anime.onnx")
    monkeypatch.setenv("U2NET_HOME", str(home))
    monkeypatch.setenv("MODEL_CHECKSUM_DISABLED", "1")
    assert resolve_model("isnet-anime", "", download=False).path == str(home / "isnet-anime.onnx")
    report = prepare_dataset(src, PrepareConfig(name="home", out=str(tmp_path / "w"), crop="center",
                                                remove_bg="isnet-anime", download=False, workers=2))
    assert report.items[0].background_removed


def test_missing_model_one_clear_message(src, tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(ModelLoadError) as err:
        prepare_dataset(src, PrepareConfig(name="m", out=str(tmp_path / "w"), remove_bg="u2net",
                                           model_dir=str(empty), download=False))
    text = str(err.value)
    assert "u2net.onnx" in text and str(empty / "u2net.onnx") in text and "\n" not in text
    assert not (tmp_path / "w" / "m" / "10_m").exists() or not any((tmp_path / "w" / "m" / "10_m").iterdir())
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.onnx"))


def test_broken_model_file_is_one_error(src, tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="could not be loaded"):
        prepare_dataset(src, PrepareConfig(name="b", out=str(tmp_path / "w"), remove_bg=str(bad), workers=1))


def test_bad_option_values():
    with pytest.raises(UserError, match="remove_bg"):
        from lib_lora.config import validate

        validate(PrepareConfig(name="x", remove_bg="magic"))
    with pytest.raises(UserError, match="bg_color"):
        validate(PrepareConfig(name="x", bg_color="not-a-colour"))


@pytest.mark.timeout(180)
def test_workers_start_after_native_thread_pools(src, tmp_path, grace_hopper):
    """Regression: plain fork after onnxruntime/OpenCV had started thread pools in this process
    left workers hung on an inherited lock (intermittently: it needs a lock held at fork time).
    Workers must start from a clean process; this checks the start method and runs the path."""
    import numpy as np

    from lib_lora.dataset.prepare import _mp_context

    assert _mp_context().get_start_method() in ("forkserver", "spawn")

    from lib_lora.dataset.background import load_session, resolve_model
    from lib_lora.dataset.faces import detect_faces

    load_session(resolve_model(str(TINY_BG_MODEL)), 0)  # onnxruntime pools, here in the parent
    detect_faces(np.asarray(grace_hopper))  # OpenCV's pool too
    _green_screen(src / "second.png", seed=30)
    report = prepare_dataset(src, PrepareConfig(name="pools", out=str(tmp_path / "w"), crop="center",
                                                remove_bg=str(TINY_BG_MODEL), workers=2))
    assert len(report.kept) == 2 and report.bg_removed
