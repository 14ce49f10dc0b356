"""Progress and cancellation, passed into every long step (never read from globals)."""

from __future__ import annotations

import sys
import threading
from typing import Protocol, runtime_checkable

from lib_lora.errors import Cancelled


@runtime_checkable
class Progress(Protocol):
    def update(self, done: int, total: int, text: str = "") -> None: ...

    def cancelled(self) -> bool: ...


class NullProgress:
    """Progress that reports nothing and can be cancelled from another thread."""

    def __init__(self) -> None:
        self._stop = threading.Event()

    def update(self, done: int, total: int, text: str = "") -> None:
        pass

    def cancel(self) -> None:
        self._stop.set()

    def cancelled(self) -> bool:
        return self._stop.is_set()


class TqdmProgress(NullProgress):
    """A tqdm bar for the CLI; one bar per `total`, re-created when the total changes."""

    def __init__(self, desc: str = "", unit: str = "it") -> None:
        super().__init__()
        self.desc, self.unit = desc, unit
        self._bar = None
        self._total = None

    def update(self, done: int, total: int, text: str = "") -> None:
        from tqdm import tqdm

        if self._bar is None or total != self._total:
            self.close()
            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, dynamic_ncols=True)
            self._total = total
        self._bar.n = done
        if text:
            self._bar.set_postfix_str(text, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def check_cancel(progress: Progress | None) -> None:
    """Raise Cancelled when the user asked to stop."""
    if progress is not None and progress.cancelled():
        raise Cancelled()
