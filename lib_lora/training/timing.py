"""A run's measured step time, kept in its run folder, and the estimate it gives the next run.

The loop reads the loss back from the device every few steps (the chart's cadence); the time
between two such reads, less any pause for samples or checkpoints, divided by the steps in
between, is one measurement. The median of them is written to `<run dir>/step_time.json`, and
a run planned later with the same model, device, resolution and batch size is estimated from
the most recent such record ("about 12 min, from the run 'astro': 2.1 s per step").
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_lora.atomic import atomic_write_json

FILE = "step_time.json"
# What a step's time depends on; a record is used for a new plan only when all of them match.
KEYS = ("base_model", "device", "resolution", "batch_size", "train_text_encoder", "gradient_checkpointing")


class StepClock:
    """Seconds per step between synchronised marks, with pauses left out."""

    def __init__(self, step: int = 0, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._last = (step, clock())
        self._paused = 0.0
        self._pause_start: float | None = None
        self.rates: list[float] = []

    def pause(self) -> None:
        if self._pause_start is None:
            self._pause_start = self.clock()

    def resume(self) -> None:
        if self._pause_start is not None:
            self._paused += self.clock() - self._pause_start
            self._pause_start = None

    def mark(self, step: int) -> None:
        now = self.clock()
        last_step, last_t = self._last
        if step > last_step:
            self.rates.append(max(0.0, now - last_t - self._paused) / (step - last_step))
        self._last, self._paused = (step, now), 0.0

    def seconds_per_step(self) -> float | None:
        # The first interval holds the warm-up (allocations, compilation): left out when there are others.
        rates = self.rates[1:] if len(self.rates) > 2 else self.rates
        return statistics.median(rates) if rates else None


def record(cfg: Any, device: str, seconds_per_step: float) -> dict[str, Any]:
    rec = {k: getattr(cfg, k, None) for k in KEYS}
    rec.update(device=device, seconds_per_step=seconds_per_step, measured_at=time.time())
    return rec


def save(run_dir: Path, rec: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / FILE, rec)


@dataclass
class Estimate:
    seconds_per_step: float
    run: str  # the run folder's name the measurement comes from
    device: str

    def minutes(self, steps: int) -> float:
        return steps * self.seconds_per_step / 60


def _device_of(cfg: Any) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def find(run_dirs: Iterable[Path], cfg: Any, any_model: bool = False) -> Estimate | None:
    """The newest matching measurement among `run_dirs`; `any_model` for a host that trains
    the model it has loaded, whose name the plan does not know."""
    want = {k: getattr(cfg, k, None) for k in KEYS if k != "device" and not (any_model and k == "base_model")}
    device = _device_of(cfg)
    best: tuple[float, Estimate] | None = None
    for d in run_dirs:
        try:
            rec = json.loads((Path(d) / FILE).read_text(encoding="utf-8"))
            sps = float(rec["seconds_per_step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not sps > 0:
            continue
        if any(rec.get(k) != v for k, v in want.items()):
            continue
        if str(rec.get("device", "")).split(":")[0] != device.split(":")[0]:
            continue
        at = float(rec.get("measured_at") or 0)
        if best is None or at > best[0]:
            best = (at, Estimate(sps, Path(d).name, str(rec.get("device"))))
    return best[1] if best else None
