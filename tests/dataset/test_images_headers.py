"""Header checks read headers: a PNG's size and EXIF orientation come without decoding its
pixels (Pillow's own PNG getexif() decodes the whole image), and agree with Pillow's answer."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from lib_lora.dataset import images


def _chunks(png: bytes) -> list[bytes]:
    out, i = [], 8
    while i < len(png):
        (length,) = struct.unpack(">I", png[i : i + 4])
        out.append(png[i : i + 12 + length])
        i += 12 + length
    return out


def _pngs(folder: Path) -> dict[str, Path]:
    """PNGs stored 64x40 with the orientation in each place Pillow reads it from."""
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    paths = {k: folder / f"{k}.png" for k in ("plain", "exif", "late_exif", "xmp")}
    im.save(paths["plain"])
    im.save(paths["exif"], exif=exif.tobytes())  # Pillow writes eXIf before the pixel data
    parts = _chunks(paths["exif"].read_bytes())
    exif_chunk = next(c for c in parts if c[4:8] == b"eXIf")
    rest = [c for c in parts if c is not exif_chunk]  # ..., IDAT, IEND: eXIf goes just before IEND
    paths["late_exif"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(rest[:-1]) + exif_chunk + rest[-1])
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta tiff:Orientation="8"/>')
    im.save(paths["xmp"], pnginfo=info)
    return paths


def _pillows_orientation(path: Path) -> int:
    with Image.open(path) as im:
        return im.getexif().get(0x0112, 1)


@pytest.mark.parametrize("kind,orientation", [("plain", 1), ("exif", 6), ("xmp", 8)])
def test_png_header_check_decodes_no_pixels(tmp_path, pixel_decodes, kind, orientation):
    path = _pngs(tmp_path)[kind]
    pixel_decodes.clear()
    info = images.inspect(path)
    assert pixel_decodes == []  # before: Pillow's PNG getexif() decoded the image here
    assert info.orientation == orientation == _pillows_orientation(path)
    assert info.size == ((64, 40) if orientation == 1 else (40, 64))


def test_png_orientation_after_the_pixel_data_is_still_found(tmp_path):
    path = _pngs(tmp_path)["late_exif"]
    with Image.open(path) as im:
        assert "exif" not in im.info  # not in the header: only a walk past the pixel data finds it
    info = images.inspect(path)
    assert info.orientation == 6 == _pillows_orientation(path) and info.size == (40, 64)


def test_truncated_png_passes_the_header_check_and_fails_the_decode(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(_pngs(tmp_path)["plain"].read_bytes()[:2000])
    info = images.inspect(path)  # the header is whole: size known, no decode
    assert info.size == (64, 40)
    with pytest.raises(images.BadImage, match="corrupt or truncated"):
        images.decode(info)


def test_load_rgb_from_bytes_reads_no_file_and_decodes_once(tmp_path, file_opens, pixel_decodes):
    paths = _pngs(tmp_path)
    for path in paths.values():
        want = images.load_rgb(path)
        data = path.read_bytes()
        file_opens.clear()
        pixel_decodes.clear()
        got = images.load_rgb(path, data)
        assert file_opens == [], path.name
        assert len(pixel_decodes) == (1 if path.stem != "late_exif" else 2), path.name
        assert got.size == want.size and got.tobytes() == want.tobytes()
