"""Progress sinks the training tests share."""

from __future__ import annotations

from lib_lora.progress import NullProgress


class StopAt(NullProgress):
    """Asks the loop to stop once `step` steps are done (what the UI's Stop button does)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.stop_at = step

    def update(self, done: int, total: int, text: str = "") -> None:
        if text != "caching latents" and done >= self.stop_at:
            self.cancel()
