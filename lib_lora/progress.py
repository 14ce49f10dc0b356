"""Progress and cancellation, passed into every long step (never read from globals)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

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
    """A tqdm bar for the CLI: one bar per phase (a new one when the total changes or the
    count goes back), the progress text as its label.

    Within a phase, an update with another label and no step done (the loop making samples or
    saving a checkpoint) is a pause: the time until the phase's own label comes back is left
    out of the bar's elapsed time and rate. `write` prints a line above the bar, keeping it.
    """

    def __init__(self, desc: str = "", unit: str = "it", file: Any = None,
                 clock: Callable[[], float] | None = None) -> None:
        super().__init__()
        self.desc, self.unit = desc, unit
        self.file = file
        self.clock = clock
        self._bar: Any = None
        self._total: int | None = None
        self._label = ""
        self._paused_at: float | None = None
        self.postfix = ""

    def _now(self) -> float:
        return self._bar._time()

    def update(self, done: int, total: int, text: str = "") -> None:
        from tqdm import tqdm

        if self._bar is None or total != self._total or done < self._bar.n:
            self.close()
            desc = f"{self.desc}: {text}" if self.desc and text else (text or self.desc)
            self._bar = tqdm(total=total, initial=done, desc=desc, unit=self.unit, file=self.file or sys.stderr,
                             dynamic_ncols=True, smoothing=0)
            if self.clock is not None:
                self._bar._time = self.clock
                self._bar.start_t = self._bar.last_print_t = self.clock()
            self._total, self._label, self._paused_at = total, text, None
        bar = self._bar
        if text and text != self._label and done == bar.n:
            if self._paused_at is None:
                self._paused_at = self._now()
            bar.set_postfix_str(text, refresh=False)
        else:
            if self._paused_at is not None:
                bar.start_t += self._now() - self._paused_at  # the pause is no part of the rate
                self._paused_at = None
            # The CLI's figure (the loss), else a per-item text (prepare's file name).
            bar.set_postfix_str(self.postfix or (text if text != self._label else ""), refresh=False)
        bar.n = done
        bar.refresh()

    def set_postfix(self, text: str) -> None:
        """A figure shown after the bar (the CLI's loss), kept until replaced."""
        self.postfix = text

    def rate(self) -> float | None:
        """Units per second as the bar shows it (pauses left out)."""
        if self._bar is None:
            return None
        d = self._bar.format_dict
        return (d["n"] - d["initial"]) / d["elapsed"] if d["elapsed"] > 0 else None

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=self.file or sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def check_cancel(progress: Progress | None) -> None:
    """Raise Cancelled when the user asked to stop."""
    if progress is not None and progress.cancelled():
        raise Cancelled()
