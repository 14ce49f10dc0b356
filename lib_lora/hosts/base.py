"""The Host interface: everything the steps need from whoever runs them."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from PIL import Image

    from lib_lora.progress import Progress
    from lib_lora.training.backbone import Backbone


class Host(Protocol):
    name: str

    def lora_dir(self) -> Path:
        """Where finished LoRAs go (the WebUI scans it recursively)."""

    def work_dir(self) -> Path:
        """Where datasets and run folders go by default (never inside lora_dir)."""

    def backbone(self, base_model: str | None = None) -> Backbone:
        """The SD1.5 model to train on: the host's loaded one, or one it loads."""

    def job(self, title: str) -> contextlib.AbstractContextManager[Progress]:
        """A job context: takes the host's lock, reports progress, carries its interrupt."""

    def tagger(self, threshold: float) -> Any | None:
        """A tagger the host already has (the WebUI's Deepbooru) reporting scores >= threshold, or None."""

    def after_save(self, lora_path: Path, progress: Progress | None = None) -> None:
        """Make a freshly written LoRA visible (refresh the WebUI's card list); inside a job, with
        the job's progress (a preview image is a phase of it, stopped by its Stop)."""

    def samplers(self) -> list[str]:
        """Sampler names the Test step offers (`generate(sampler_name=...)`); the first is the default."""

    def generate(self, prompts: list[str], seed: int, **kw: Any) -> list[Image.Image]:
        """Generate images for the Test step."""
