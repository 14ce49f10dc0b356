"""How often the data path reads and decodes each image: the scan reads headers only, caching
latents reads each file once and decodes it once (not at all on a disk-cache hit), and a file
broken past its header is still caught, at latent caching, and the run goes on without it."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from lib_lora.config import TrainConfig
from lib_lora.errors import UserError
from lib_lora.training import data
from lib_lora.training.run import train


@pytest.fixture
def mixed_dataset(tmp_path, drawn_dataset) -> Path:
    """The drawn PNGs plus one JPEG with an EXIF rotation (header-only reads must see it)."""
    root = tmp_path / "ds"
    shutil.copytree(drawn_dataset, root)
    sub = next(root.iterdir())
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 48), (10, 120, 200)).save(sub / "rotated.jpg", exif=exif.tobytes())
    return root


def _images(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.suffix in (".png", ".jpg"))


def _cfg(tmp_path: Path, dataset: Path, **kw) -> TrainConfig:
    base = dict(
        name="reads", dataset=str(dataset), output_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"),
        resolution=64, dim=4, alpha=4.0, lr="1e-3", optimizer="adamw", device="cpu", max_steps=2,
        log_every_n_steps=1, cache_latents_to_disk=False, bucket_no_upscale=False,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_scan_reads_image_headers_only(tmp_path, mixed_dataset, file_opens, pixel_decodes):
    ds = data.scan_dataset(mixed_dataset, _cfg(tmp_path, mixed_dataset))
    images = _images(mixed_dataset)
    assert len(ds.items) == len(images) == 5
    assert pixel_decodes == []  # before: two full decodes per PNG, one per JPEG
    opened = Counter(p for p in file_opens if p in images)
    assert opened == Counter(images)  # each file opened once (before: three times)
    rotated = next(it for it in ds.items if it.path.name == "rotated.jpg")
    assert rotated.size == (48, 64)  # the EXIF rotation, from the header


def test_caching_latents_reads_and_decodes_each_image_once(tmp_path, mixed_dataset, tiny_backbone,
                                                           file_opens, pixel_decodes):  # fmt: skip
    items = data.scan_dataset(mixed_dataset, _cfg(tmp_path, mixed_dataset)).items
    images = _images(mixed_dataset)
    file_opens.clear()
    first = data.cache_latents(items, tiny_backbone, tmp_path / "cache")
    assert len(first) == 5 and all(it.digest for it in items)
    assert Counter(p for p in file_opens if p in images) == Counter(images)  # before: twice each
    assert len(pixel_decodes) == 5  # before: 9 (two per PNG: Pillow's PNG getexif decoded too)

    # From the disk cache: each file is read once for its digest, and nothing is decoded.
    file_opens.clear()
    pixel_decodes.clear()
    again = data.cache_latents(list(items), tiny_backbone, tmp_path / "cache")
    assert again.keys() == first.keys()
    assert Counter(p for p in file_opens if p in images) == Counter(images) and pixel_decodes == []


def test_a_file_truncated_past_its_header_is_dropped_at_latent_caching(tmp_path, drawn_dataset, tiny_backbone):
    root = tmp_path / "ds"
    shutil.copytree(drawn_dataset, root)
    sub = next(root.iterdir())
    whole = (sub / "00.png").read_bytes()
    (sub / "cut.png").write_bytes(whole[: len(whole) // 2])
    cfg = _cfg(tmp_path, root)
    assert data.plan_steps(root, cfg).images == 5  # the header is whole: the scan cannot tell

    events: list[dict] = []
    res = train(cfg, backbone=tiny_backbone, on_event=events.append)
    assert res.steps == 2
    plan = [e for e in events if e["kind"] == "plan"][-1]
    assert plan["images"] == 4
    (skip,) = plan["skipped"]
    assert Path(skip["path"]).name == "cut.png" and "corrupt or truncated" in skip["reason"]
    assert "cut.png" in plan["text"]  # the user sees which file, and why

    # Nothing usable left: the run stops with one clear sentence, before any step.
    only = tmp_path / "only_cut"
    only.mkdir()
    shutil.copy(sub / "cut.png", only / "cut.png")
    with pytest.raises(UserError, match="None of the dataset's images could be loaded"):
        train(_cfg(tmp_path / "b", only), backbone=tiny_backbone)
