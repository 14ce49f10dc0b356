"""A folder of awkward and broken files: good ones come out 512x512 RGB, bad ones are
reported once with their reason, nothing escapes, the source folder is untouched."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_lora.config import PrepareConfig
from lib_lora.dataset.manifest import read_manifest
from lib_lora.dataset.prepare import prepare_dataset
from lib_lora.errors import Cancelled, DatasetError


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (a decompression bomb's calling card)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


GOOD = {}  # file name -> what to check beyond "512x512 RGB"
BAD = {}  # file name -> a piece of the reason the user must see


def build_corpus(src: Path, pattern) -> None:
    src.mkdir(parents=True)
    rgb = lambda i, w=800, h=600: Image.fromarray(pattern(i, w, h))  # noqa: E731

    rgb(1).save(src / "plain.jpg", quality=92)
    GOOD["plain.jpg"] = None
    rgb(2).convert("CMYK").save(src / "cmyk.jpg", quality=92)
    GOOD["cmyk.jpg"] = None
    grad = (np.linspace(0, 65535, 700)[None, :] * np.ones((600, 1))).astype(np.uint16)
    Image.fromarray(grad).save(src / "gray16.png")  # mode I;16: a naive convert is all white
    GOOD["gray16.png"] = "not_white"
    pal = rgb(3).convert("P")  # web palette: adaptive quantizing is slow
    pal.info["transparency"] = 0
    pal.save(src / "palette_transparent.png", transparency=0)
    GOOD["palette_transparent.png"] = None
    la = rgb(4).convert("LA")
    la.putalpha(Image.fromarray(np.where(pattern(40)[..., 0] > 128, 255, 0).astype(np.uint8)))
    la.save(src / "gray_alpha.png")
    GOOD["gray_alpha.png"] = None
    frames = [rgb(5 + k).convert("P") for k in range(3)]
    frames[0].save(src / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    GOOD["animated.gif"] = "animated"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    rgb(8).save(src / "rotated_exif.jpg", exif=exif.tobytes(), quality=92)
    GOOD["rotated_exif.jpg"] = "portrait"
    rgb(9).save(src / "photo.webp", quality=90)
    GOOD["photo.webp"] = None
    rgb(10).save(src / "scan.tiff")
    GOOD["scan.tiff"] = None
    rgb(11).save(src / "照片 über 1.png")
    GOOD["照片 über 1.png"] = None
    rgb(12).save(src / "bitmap.bmp")
    GOOD["bitmap.bmp"] = None
    rgba = rgb(13).convert("RGBA")
    a = np.full((600, 800), 255, np.uint8)
    a[:, :150] = 0
    rgba.putalpha(Image.fromarray(a))
    rgba.save(src / "cutout.png")
    GOOD["cutout.png"] = None
    rgb(14, 1200, 900).save(src / "Photo With Spaces.JPEG", quality=90)
    GOOD["Photo With Spaces.JPEG"] = None

    (src / "empty.jpg").write_bytes(b"")
    BAD["empty.jpg"] = "empty file"
    buf = io.BytesIO()
    rgb(15).save(buf, "JPEG", quality=92)
    (src / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    BAD["truncated.jpg"] = "truncated"
    (src / "notes.png").write_text("this is not a picture\n", encoding="utf-8")
    BAD["notes.png"] = "not an image"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(src / "pixel.png")
    BAD["pixel.png"] = "too small"
    (src / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    BAD["bomb.png"] = "too large"
    (src / "big_header.png").write_bytes(_png_header_only(13_000, 12_000))
    BAD["big_header.png"] = "megapixel limit"
    shutil.copyfile(src / "plain.jpg", src / "plain_dup.jpg")
    BAD["plain_dup.jpg"] = "exact duplicate of plain.jpg"
    (src / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic")
    BAD["phone.heic"] = "not supported"
    (src / "readme.txt").write_text("captions and notes are ignored", encoding="utf-8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, pattern, tree_hashes) -> tuple[Path, dict]:
    src = tmp_path_factory.mktemp("corpus") / "photos"
    build_corpus(src, pattern)
    return src, tree_hashes(src)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    src, _ = corpus
    out = tmp_path_factory.mktemp("work")
    cfg = PrepareConfig(name="corpus", out=str(out), crop="center", workers=2)
    return prepare_dataset(src, cfg), out


def test_every_kind_is_covered(corpus):
    assert len(GOOD) + len(BAD) >= 20


def test_good_files_become_512_rgb(prepared):
    report, out = prepared
    by_name = {r.source.name: r for r in report.items}
    assert report.image_dir == out / "corpus" / "10_corpus"
    for name, check in GOOD.items():
        rec = by_name[name]
        assert rec.kept, f"{name}: {rec.message}"
        assert rec.output.parent == report.image_dir
        with Image.open(rec.output) as img:
            assert img.size == (512, 512) and img.mode == "RGB", name
            arr = np.asarray(img)
        if check == "not_white":
            assert 60 < arr.mean() < 200, "16-bit values were clipped instead of scaled"
        if check == "animated":
            assert "first frame" in rec.message
        if check == "portrait":
            assert rec.source_size == (600, 800)


def test_transparent_images_flattened_on_white(prepared):
    report, _ = prepared
    rec = next(r for r in report.items if r.source.name == "cutout.png")
    assert rec.background_model == "source alpha" and rec.background_removed
    with Image.open(rec.output) as img:
        left = np.asarray(img)[:, :10]
    assert left.min() >= 250  # the transparent strip is white now


def test_bad_files_reported_once_with_reason(prepared):
    report, _ = prepared
    by_name = {r.source.name: r for r in report.items}
    assert len(by_name) == len(report.items)  # one record per file, nothing twice
    for name, reason in BAD.items():
        rec = by_name[name]
        assert rec.status == "skipped" and rec.output is None, name
        assert reason in rec.message, f"{name}: {rec.message!r}"
        assert "\n" not in rec.message
    summary = report.summary()
    for name in BAD:
        assert summary.count(f"  {name}: ") == 1
    assert "readme.txt" not in by_name and report.ignored_files == 1


def test_source_folder_untouched(corpus, prepared, tree_hashes):
    src, before = corpus
    assert tree_hashes(src) == before


def test_outputs_written_atomically_and_manifest(prepared):
    report, out = prepared
    leftovers = [p for p in (out / "corpus").rglob("*") if ".fastlora-tmp-" in p.name]
    assert leftovers == []
    data = read_manifest(out / "corpus")
    assert data["image_dir"] == "10_corpus"
    assert data["background"] == {"removed": False, "color": "white", "rgb": [255, 255, 255], "model": None,
                                  "tags": []}
    items = {Path(i["source"]).name: i for i in data["items"]}
    plain = items["plain.jpg"]
    assert len(plain["source_sha256"]) == 64 and len(plain["output_sha256"]) == 64
    assert plain["crop_box"] == [100, 0, 700, 600]
    assert plain["output"] == "10_corpus/plain.png"


def test_rerun_skips_unchanged_and_redoes_on_new_settings(corpus, tmp_path):
    src, _ = corpus
    cfg = PrepareConfig(name="again", out=str(tmp_path), crop="center", workers=1)
    first = prepare_dataset(src, cfg)
    assert not any(r.unchanged for r in first.items)
    second = prepare_dataset(src, cfg)
    assert all(r.unchanged for r in second.items if r.kept)
    assert next(r for r in second.items if r.source.name == "notes.png").unchanged  # bad stays bad, not redone
    assert [r.output for r in second.items] == [r.output for r in first.items]
    third = prepare_dataset(src, PrepareConfig(name="again", out=str(tmp_path), crop="center", size=256,
                                               workers=1, repeats=30))
    assert not any(r.unchanged for r in third.items)
    assert third.image_dir.name == "30_again" and not (tmp_path / "again" / "10_again").exists()
    with Image.open(third.image_dir / "plain.png") as img:
        assert img.size == (256, 256)


def test_outputs_of_removed_sources_deleted_with_relative_out(tmp_path, pattern, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(pattern(70)).save(src / "keep.png")
    Image.fromarray(pattern(71)).save(src / "gone.png")
    cfg = PrepareConfig(name="rel", out="work", crop="center", workers=1)
    first = prepare_dataset(src, cfg)
    gone = next(r.output for r in first.items if r.source.name == "gone.png")
    assert gone.is_file()
    (src / "gone.png").unlink()
    second = prepare_dataset(src, cfg)
    assert not gone.exists() and [p.name for p in second.removed_outputs] == ["gone.png"]
    assert (second.image_dir / "keep.png").is_file()


def test_small_image_warned_not_upscaled(tmp_path, pattern):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(pattern(50, 200, 150)).save(src / "small.png")
    report = prepare_dataset(src, PrepareConfig(name="s", out=str(tmp_path / "w"), workers=1))
    rec = report.items[0]
    assert rec.status == "warning" and "small (200x150)" in rec.message
    assert rec.output_size == (150, 150)
    up = prepare_dataset(src, PrepareConfig(name="s2", out=str(tmp_path / "w"), workers=1, upscale=True))
    assert up.items[0].output_size == (512, 512)


def test_near_duplicates_reported(tmp_path, pattern):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(pattern(60)).save(src / "a.png")
    Image.fromarray(pattern(60)).save(src / "b.jpg", quality=80)  # same picture, other bytes
    Image.fromarray(pattern(61)).save(src / "c.png")
    report = prepare_dataset(src, PrepareConfig(name="nd", out=str(tmp_path / "w"), crop="center", workers=1))
    by = {r.source.name: r for r in report.items}
    assert by["b.jpg"].status == "warning" and "near duplicate of a.png" in by["b.jpg"].message
    assert by["c.png"].status == "ok" and by["a.png"].status == "ok"


def test_new_near_duplicate_of_unchanged_later_image_reported(tmp_path, pattern):
    src = tmp_path / "src"
    src.mkdir()
    picture = pattern(62)
    Image.fromarray(picture).save(src / "b.png")
    cfg = PrepareConfig(name="nd2", out=str(tmp_path / "w"), crop="center", workers=1)
    prepare_dataset(src, cfg)
    nudged = picture.copy()
    nudged[0, 0] ^= 1  # other bytes, same photo
    Image.fromarray(nudged).save(src / "a.png")
    report = prepare_dataset(src, cfg)
    by = {r.source.name: r for r in report.items}
    assert by["b.png"].unchanged and by["b.png"].status == "ok"
    assert by["a.png"].status == "warning" and "near duplicate of b.png" in by["a.png"].message
    assert by["a.png"].duplicate_of == src / "b.png"


def test_no_usable_images_is_one_clear_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.png").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="None of the 1 files"):
        prepare_dataset(src, PrepareConfig(name="e", out=str(tmp_path / "w"), workers=1))
    with pytest.raises(DatasetError, match="No images found"):
        prepare_dataset(tmp_path / "w", PrepareConfig(name="e2", out=str(tmp_path / "w2"), workers=1))


def test_recursive_and_output_inside_source(tmp_path, pattern):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(pattern(70)).save(src / "top.png")
    Image.fromarray(pattern(71)).save(src / "sub" / "top.png")  # same stem: needs a unique output
    flat = prepare_dataset(src, PrepareConfig(name="r", out=str(src / "work"), crop="center", workers=1))
    assert [r.source.name for r in flat.items] == ["top.png"]
    deep = prepare_dataset(src, PrepareConfig(name="r", out=str(src / "work"), crop="center", workers=1,
                                              recursive=True))
    outs = sorted(r.output.name for r in deep.items)
    assert outs == ["top.png", "top_2.png"]  # and our own outputs under src/work were not imported


def test_cancel_stops(tmp_path, corpus):
    src, _ = corpus

    class StopAfterFirst:
        def __init__(self):
            self.calls = 0

        def update(self, done, total, text=""):
            self.calls += 1

        def cancelled(self):
            return self.calls > 1

    cfg = PrepareConfig(name="c", out=str(tmp_path), crop="center", workers=1)
    with pytest.raises(Cancelled):
        prepare_dataset(src, cfg, StopAfterFirst())
    kept = [i for i in read_manifest(tmp_path / "c")["items"] if i["output"]]
    assert len(kept) == 1  # the one finished image is remembered...
    again = prepare_dataset(src, cfg)
    assert sum(r.unchanged for r in again.kept) == 1  # ...and not redone
    assert len(again.kept) == len(GOOD)
