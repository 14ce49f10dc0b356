"""Face-aware crop on real photographs that ship offline (scikit-image, matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_lora.config import PrepareConfig
from lib_lora.dataset import crop
from lib_lora.dataset.faces import detect_faces
from lib_lora.dataset.prepare import prepare_dataset


def _inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def _canvas(face_img: Image.Image, seed: int = 0) -> Image.Image:
    """The photo at twice its size in a larger, grainy 2400x1600 frame, off-centre."""
    rng = np.random.default_rng(seed)
    bg = np.clip(rng.normal(120, 15, (1600, 2400, 3)), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(bg)
    canvas.paste(face_img.resize((1024, 1024), Image.Resampling.LANCZOS), (1250, 350))
    return canvas


@pytest.fixture(scope="module")
def photos(tmp_path_factory, astronaut, grace_hopper) -> Path:
    src = tmp_path_factory.mktemp("faces") / "src"
    src.mkdir()
    grace_hopper.save(src / "hopper.jpg", quality=95)
    _canvas(astronaut).save(src / "astronaut_wide.jpg", quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": store it turned the other way
    _canvas(astronaut).transpose(Image.Transpose.ROTATE_90).save(src / "astronaut_rotated.jpg", quality=92,
                                                                  exif=exif.tobytes())
    return src


@pytest.fixture(scope="module")
def report(photos, tmp_path_factory):
    return prepare_dataset(photos, PrepareConfig(name="faces", out=str(tmp_path_factory.mktemp("w")), workers=2))


def test_face_found_and_inside_square_crop(report):
    assert len(report.kept) == 3
    for rec in report.kept:
        assert rec.crop_mode == "face" and rec.face_box is not None, rec.source.name
        x0, y0, x1, y1 = rec.crop_box
        assert x1 - x0 == y1 - y0, "crop is not square"
        assert _inside(rec.face_box, rec.crop_box), rec.source.name
        assert rec.output_size == (512, 512)
        with Image.open(rec.output) as img:
            assert img.size == (512, 512) and img.mode == "RGB"
    assert report.faces_found == 3
    assert "Faces found: 3 of 3" in report.summary()


def test_head_and_shoulders_framing(report):
    rec = next(r for r in report.kept if r.source.name == "astronaut_wide.jpg")
    fw = rec.face_box[2] - rec.face_box[0]
    side = rec.crop_box[2] - rec.crop_box[0]
    assert 2.0 * fw <= side <= 3.5 * fw  # a head-and-shoulders shot, not the whole frame
    # The face sits in the upper-middle of the square.
    fcx = (rec.face_box[0] + rec.face_box[2]) / 2 - rec.crop_box[0]
    fcy = (rec.face_box[1] + rec.face_box[3]) / 2 - rec.crop_box[1]
    assert 0.3 * side < fcx < 0.7 * side and 0.25 * side < fcy < 0.6 * side
    # The astronaut was pasted at (1250, 350) with size 1024: the crop lies on it, not on the grain.
    assert _inside(rec.face_box, (1250, 350, 2274, 1374))


def test_exif_rotation_respected(report, astronaut):
    by = {r.source.name: r for r in report.kept}
    straight, rotated = by["astronaut_wide.jpg"], by["astronaut_rotated.jpg"]
    assert rotated.source_size == straight.source_size == (2400, 1600)  # stored 1600x2400, shown landscape
    assert np.abs(np.subtract(rotated.face_box, straight.face_box)).max() <= 40
    # The output is the upright picture's crop box: cut the same box from the upright original.
    upright = _canvas(astronaut)
    for rec in (straight, rotated):
        expect = np.asarray(upright.resize((512, 512), Image.Resampling.LANCZOS, box=rec.crop_box), np.float32)
        with Image.open(rec.output) as img:
            got = np.asarray(img, np.float32)
            sideways = np.asarray(img.transpose(Image.Transpose.ROTATE_90), np.float32)
        assert np.abs(got - expect).mean() < 6, rec.source.name
        assert np.abs(sideways - expect).mean() > 20


def test_small_face_photo_widens_instead_of_shrinking(astronaut, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    astronaut.save(src / "astronaut.png")  # 512x512, face ~95 px: a 2.8x frame would be ~270 px
    rec = prepare_dataset(src, PrepareConfig(name="a", out=str(tmp_path / "w"), workers=1)).items[0]
    assert rec.output_size == (512, 512) and rec.crop_box == (0, 0, 512, 512)
    up = prepare_dataset(src, PrepareConfig(name="b", out=str(tmp_path / "w"), workers=1, upscale=True)).items[0]
    assert up.output_size == (512, 512) and up.crop_box[2] - up.crop_box[0] < 400
    assert _inside(up.face_box, up.crop_box)


def test_no_face_falls_back_to_focal_point(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    arr = np.full((600, 1200, 3), 200, np.uint8)
    rng = np.random.default_rng(3)
    arr[150:450, 850:1150] = rng.integers(0, 255, (300, 300, 3))  # all the detail is on the right
    Image.fromarray(arr).save(src / "object.png")
    rec = prepare_dataset(src, PrepareConfig(name="o", out=str(tmp_path / "w"), workers=1)).items[0]
    assert rec.crop_mode == "focal" and rec.face_box is None
    assert "no face found" in rec.message and rec.status == "warning"
    assert rec.crop_box == (600, 0, 1200, 600)  # the square slid right, onto the detail


def test_detector_on_real_photo(grace_hopper):
    faces = detect_faces(np.asarray(grace_hopper))
    assert faces, "Haar cascade found no face on a frontal portrait"
    f = faces[0]
    assert 150 < f.x + f.w / 2 < 350 and 100 < f.y + f.h / 2 < 350  # her face is upper-middle


def test_bucket_mode_keeps_aspect(photos, tmp_path):
    report = prepare_dataset(photos, PrepareConfig(name="b", out=str(tmp_path), crop="bucket", workers=1))
    for rec in report.kept:
        w, h = rec.output_size
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512
        bw, bh = rec.crop_box[2] - rec.crop_box[0], rec.crop_box[3] - rec.crop_box[1]
        assert abs(bw / bh - w / h) < 0.02
        if rec.face_box:
            assert _inside(rec.face_box, rec.crop_box)
    wide = next(r for r in report.kept if r.source.name == "astronaut_wide.jpg")
    assert wide.output_size[0] > wide.output_size[1]  # 3:2 landscape stays landscape


def test_none_mode_keeps_whole_image(photos, tmp_path):
    report = prepare_dataset(photos, PrepareConfig(name="n", out=str(tmp_path), crop="none", workers=1))
    wide = next(r for r in report.kept if r.source.name == "astronaut_wide.jpg")
    assert wide.crop_box == (0, 0, 2400, 1600)
    w, h = wide.output_size
    assert abs(w / h - 1.5) < 0.01 and abs(w * h - 512 * 512) < 2000


def test_crop_geometry_rules():
    buckets = crop.make_buckets(512)
    assert (512, 512) in buckets and all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert crop.nearest_bucket(3000, 2000, 512) in {(640, 384), (576, 448), (640, 448)}
    box, out = crop.bucket_crop(300, 200, 512, upscale=False)
    assert out == (256, 192) and box[2] - box[0] == 256  # small: its own downscale-only bucket
    assert crop.clamp_box((-50, -10, 700, 300), 640, 480, square=True) == (170, 0, 470, 300)  # centred
    with pytest.raises(ValueError):
        crop.clamp_box((700, 0, 800, 100), 640, 480, square=False)
    assert crop.whole_output(300, 200, 512, upscale=False) == (300, 200)


def test_yunet_discovery_and_fallback(tmp_path, grace_hopper):
    from lib_lora.dataset.faces import find_yunet

    assert find_yunet("", tmp_path) is None
    bogus = tmp_path / "face_detection_yunet_2023mar.onnx"
    bogus.write_bytes(b"not an onnx file")
    assert find_yunet("", tmp_path) == str(bogus)
    assert find_yunet(str(tmp_path / "missing.onnx"), tmp_path) is None
    # A file OpenCV cannot load must not cost the faces: the Haar cascades take over.
    faces = detect_faces(np.asarray(grace_hopper), str(bogus))
    assert faces and 150 < faces[0].x + faces[0].w / 2 < 350
