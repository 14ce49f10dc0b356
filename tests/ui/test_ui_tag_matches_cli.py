"""The Tag tab and `python -m lib_lora tag` write the same captions for the same settings."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from lib_lora.cli import main
from lib_lora.config import TagConfig
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.ui import forms, tab_tag
from lib_lora.ui.context import UIContext

COLOURS = {"red.png": (255, 0, 0), "white.png": (255, 255, 255), "blue.png": (0, 0, 255)}


def image_folder(root: Path) -> Path:
    folder = root / "30_Zhang"
    folder.mkdir(parents=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (64, 64), rgb).save(folder / name)
    return folder


def captions(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}


def test_tag_tab_and_cli_write_the_same_captions(tmp_path: Path, tagger_files) -> None:
    model, tags = tagger_files
    # A score floor above the threshold: the tiny model's ^_^ scores 0.27, between the two.
    settings = dict(tagger="deepdanbooru", model=str(model), tags_file=str(tags), general_threshold=0.2,
                    score_floor=0.3, keep_underscores=True, allow_download=False)  # fmt: skip
    cli_dir, tab_dir = image_folder(tmp_path / "cli"), image_folder(tmp_path / "tab")

    flags = [arg for key, value in settings.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    assert main(["tag", str(cli_dir), *flags]) == 0

    # The Tag tab's handler, with its controls filled in as build() lays them out.
    groups = [forms.fields(TagConfig, group, skip=tab_tag.RULE_FIELDS) for group in ("basic", "advanced")]
    names = [f.name for fields in groups for f in fields]
    values = forms.values_of(TagConfig(**settings), names)
    host = StandaloneHost(output_dir=tmp_path / "loras", work_dir=tmp_path / "work", device="cpu")
    *_, (status, _gallery, _rows, _button) = tab_tag.run_tag(UIContext(host=host), str(tab_dir), names, *values)
    assert "3 of 3 images tagged with deepdanbooru" in status, status

    cli, tab = captions(cli_dir), captions(tab_dir)
    assert set(cli) == {"red.txt", "white.txt", "blue.txt"}
    assert tab == cli
    assert "^_^" in cli["red.txt"].split(", ") and "long_hair" in cli["red.txt"].split(", ")
