"""Long actions run in a worker thread; the page polls them.

A gradio handler that ran a 10-minute training directly would hold its request for the
whole time and show nothing. Instead `JobRunner.start` runs the step in a thread with a
`JobProgress` (the core's Progress protocol plus an event list), and the handler is a
generator that yields the job's state at least every second until it ends. One job runs at
a time per runner: the steps share one model and one device.

Jobs belong to the server, not to a page: the runner keeps each tab's last job, so a
reloaded page (or a second one) attaches to the running job and shows its progress, events
and result. Warnings reach the job two ways, as the CLI prints them: the core's phase events
marked `level="warning"`, and records logged at WARNING or above under `lib_lora` while the
job runs.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lib_lora.errors import Cancelled, UserError, file_error, is_file_error

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


class JobProgress:
    """Progress + cancellation + an event log, filled by the worker, read by the page."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.done = 0
        self.total = 0
        self.text = ""
        self.started = time.monotonic()
        self._rate_mark: tuple[float, int] | None = None  # (time, done) when the current total began
        self.events: list[dict[str, Any]] = []
        self.warnings: list[str] = []

    # The core's Progress protocol
    def update(self, done: int, total: int, text: str = "") -> None:
        with self._lock:
            now = time.monotonic()
            if total != self.total or self._rate_mark is None or done < self.done:
                self._rate_mark = (now, done)
            self.done, self.total = int(done), int(total)
            if text:
                self.text = text

    def cancelled(self) -> bool:
        return self._stop.is_set()

    def cancel(self) -> None:
        self._stop.set()

    # Events from the training loop (`on_event`)
    def event(self, ev: dict[str, Any]) -> None:
        with self._lock:
            self.events.append(dict(ev))
        if ev.get("level") == "warning" and ev.get("text"):
            self.warn(str(ev["text"]))

    def warn(self, text: str) -> None:
        """A line for the job's warnings box (each once)."""
        with self._lock:
            if text and text not in self.warnings:
                self.warnings.append(text)

    def events_since(self, n: int) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events[n:])

    def eta_seconds(self) -> float | None:
        """Remaining time from the rate since the current phase (total) began."""
        with self._lock:
            if not self._rate_mark or self.total <= 0 or self.done >= self.total:
                return None
            t0, d0 = self._rate_mark
            elapsed, advanced = time.monotonic() - t0, self.done - d0
            if advanced <= 0 or elapsed <= 0:
                return None
            return (self.total - self.done) * elapsed / advanced

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class _WarningsToJob(logging.Handler):
    """WARNING records under `lib_lora` while a job runs -> the job's warnings box."""

    def __init__(self, progress: JobProgress) -> None:
        super().__init__(logging.WARNING)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.warn(record.getMessage())
        except Exception:  # noqa: BLE001 - a bad log call must never break the job
            self.handleError(record)


@dataclass
class Job:
    title: str
    progress: JobProgress
    tab: str = ""  # which tab started it; a reloaded page reattaches by this key
    thread: threading.Thread | None = None
    host_progress: Any = None  # the host's own progress while the job runs (the WebUI's state)
    view: dict[str, Any] = field(default_factory=dict)  # what the tab needs to show it again after a reload
    result: Any = None
    error: str | None = None  # a message for the user
    cancelled: bool = False
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def running(self) -> bool:
        return not self.finished.is_set()


class JobRunner:
    """Runs one job at a time in a daemon thread."""

    def __init__(self, job_context: Callable[[str], Any] | None = None) -> None:
        # `job_context(title)` is the host's job(): a context manager around the work (the
        # WebUI's queue lock). It may yield its own Progress; ours stays the one we read.
        self._job_context = job_context
        self._lock = threading.Lock()
        self.current: Job | None = None
        self.last: dict[str, Job] = {}  # tab -> its latest job, running or finished

    def busy(self) -> bool:
        return self.current is not None and self.current.running

    def job_for(self, tab: str) -> Job | None:
        """The tab's running or latest job (what a reloaded page shows), or None."""
        return self.last.get(tab)

    def start(self, title: str, fn: Callable[[JobProgress], Any], tab: str | None = None,
              view: dict[str, Any] | None = None) -> Job:
        with self._lock:
            if self.busy():
                raise UserError(f"'{self.current.title}' is still running; wait for it or press Stop.")
            job = Job(title=title, progress=JobProgress(), tab=tab or title, view=dict(view or {}))
            job.thread = threading.Thread(target=self._run, args=(job, fn), name=f"fast-lora {title}", daemon=True)
            self.current = job
            self.last[job.tab] = job
        job.thread.start()
        return job

    def _run(self, job: Job, fn: Callable[[JobProgress], Any]) -> None:
        catcher = _WarningsToJob(job.progress)
        logging.getLogger("lib_lora").addHandler(catcher)
        try:
            if self._job_context is not None:
                with self._job_context(job.title) as host_progress:
                    job.host_progress = host_progress
                    job.result = fn(_Linked(job.progress, host_progress))
            else:
                job.result = fn(job.progress)
        except Cancelled:
            job.cancelled = True
        except UserError as err:
            job.error = str(err)
        except MemoryError:
            job.error = "Out of memory: close other programs, or lower the batch size or resolution."
        except Exception as err:  # the page must say what happened instead of hanging
            log.error("%s failed:\n%s", job.title, traceback.format_exc())
            if is_file_error(err):
                job.error = str(file_error(err, doing="use"))
            elif "out of memory" in str(err).lower():
                job.error = "Out of GPU memory: lower the batch size or resolution, or enable gradient checkpointing."
            else:
                job.error = f"{job.title} failed: {type(err).__name__}: {err}"
        finally:
            logging.getLogger("lib_lora").removeHandler(catcher)
            job.host_progress = None
            job.finished.set()

    def stop(self) -> bool:
        """Ask the running job to stop at its next check; False when nothing runs. The host's
        own cancel (the WebUI's Interrupt) is pulled too, so its generation stops as well."""
        job = self.current
        if job is None or not job.running:
            return False
        job.progress.cancel()
        host_cancel = getattr(job.host_progress, "cancel", None)
        if callable(host_cancel):
            host_cancel()
        return True

    def follow(self, job: Job, interval: float = POLL_SECONDS) -> Iterator[Job]:
        return job_updates(job, interval)


def job_updates(job: Job, interval: float = POLL_SECONDS) -> Iterator[Job]:
    """Yield the job every `interval` seconds while it runs, and once more when it ends."""
    while not job.finished.wait(interval):
        yield job
    yield job


class _Linked:
    """Our JobProgress, also forwarding to the host's progress (the WebUI's progress bar)
    and honouring the host's interrupt."""

    def __init__(self, ours: JobProgress, host: Any) -> None:
        self.ours, self.host = ours, host

    def update(self, done: int, total: int, text: str = "") -> None:
        self.ours.update(done, total, text)
        if self.host is not None and hasattr(self.host, "update"):
            self.host.update(done, total, text)

    def cancelled(self) -> bool:
        host_cancelled = self.host is not None and hasattr(self.host, "cancelled") and self.host.cancelled()
        return self.ours.cancelled() or bool(host_cancelled)

    def cancel(self) -> None:
        self.ours.cancel()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ours, name)


def stop_view(runner: JobRunner, tab: str, done_text: str = "Stopped.", interval: float = POLL_SECONDS,
              ) -> Iterator[str]:
    """A tab's Stop button: stop that tab's running job and say so at once, then say when it
    has ended (its status shows this even when the page's own follow stream is gone)."""
    from lib_lora.ui import widgets

    job = runner.current
    if job is None or not job.running:
        yield widgets.message_html("Nothing is running.", "info")
        return
    if job.tab != tab:
        yield widgets.message_html(f"Nothing of this tab is running ('{job.title}' runs on its own tab).", "info")
        return
    runner.stop()
    while not job.finished.wait(interval):
        yield widgets.message_html(f"Stopping '{job.title}': it ends at its next step…", "stopped")
    if job.error:
        yield widgets.message_html(job.error, "error")
    elif job.cancelled:
        yield widgets.message_html(done_text, "stopped")
    else:  # it reached its end first (or Stop only cut its last part, as the WebUI's preview)
        yield widgets.message_html(f"'{job.title}' finished before it could stop; its result is kept.", "ok")


def stop_handler(runner: JobRunner, tab: str, done_text: str = "Stopped.") -> Callable[[], Iterator[str]]:
    """The gradio handler of a tab's Stop button (a generator: its status updates live)."""

    def stop() -> Iterator[str]:
        yield from stop_view(runner, tab, done_text)

    return stop
