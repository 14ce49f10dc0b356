"""The learning-rate probe (`--lr auto`): the tutorial's "estimate parameters" step, in-process.

The tutorial starts a run with D-Adaptation Adam (lr 1.0 U-Net / 0.5 text encoder, constant),
reads the flat `lr/d*lr` line off TensorBoard after ~5% of the steps, kills the run and starts
again with AdamW8bit at that value. Here the same happens inside one run, on the model and the
latents already in memory: `run_probe` trains with the adaptive optimizer and records `d x lr`
per step and group until the curve has settled (`is_settled`) or a step budget is spent
(`probe_budget`); then the LoRA weights and the RNG state are put back exactly as they were,
so the real training that follows is the run a user would have started by hand with
`--lr <found value>`.

The value found on the tiny test model says nothing about SD1.5 (see docs/LR_PROBE.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lib_lora.atomic import atomic_path, atomic_write_json
from lib_lora.progress import check_cancel
from lib_lora.training.optim import group_lrs

if TYPE_CHECKING:
    from lib_lora.config import TrainConfig
    from lib_lora.training.data import Batch
    from lib_lora.training.run_state import RunEvents, RunState

# build_optimizer(cfg, unet_lr, te_lr): the loop's optimizer, schedule and noise generator,
# made from these settings into the run state (run.Trainer.build_optimizer).
BuildOptimizer = Callable[["TrainConfig", float, float], None]
TrainStep = Callable[["Batch"], torch.Tensor]  # the loop's train step on the run state

log = logging.getLogger(__name__)

ADAPTIVE = ("dadaptation", "prodigy")
# The tutorial's probe settings: lr 1.0 for the U-Net, 0.5 for the text encoder, constant.
# DAdaptAdam and Prodigy share one d over all groups and refuse different lrs per group;
# DAdaptAdam scales a group by 'layer_scale' instead (the text encoder gets 0.5 that way);
# Prodigy has no such knob, so under Prodigy the text encoder steps at the U-Net's d x lr.
PROBE_UNET_LR = 1.0
PROBE_TE_LR = 0.5
PROBE_LABEL = "LR probe"  # the progress text while the probe runs
PLOT_NAME = "lr_probe.png"
CURVE_NAME = "lr_probe.json"
METADATA_KEY = "fastlora_lr_probe"


# ------------------------------------------------------------------------------ pure functions
def probe_budget(total_steps: int, fraction: float, floor: int, cap: int) -> int:
    """Most probe steps: `fraction` of the run's steps, never fewer than `floor` nor more than `cap`."""
    cap = max(1, cap)
    return max(1, min(cap, max(floor, int(math.ceil(total_steps * fraction)))))


def is_settled(curve: Sequence[float], window: int, tolerance: float) -> bool:
    """Whether `d x lr` has stopped moving: over the last `window` steps it changed by less than
    `tolerance` (relative), and it has grown since the first step (D-Adaptation and Prodigy start
    from a tiny d0 and only ever raise d, so a curve still flat at its start has not begun)."""
    window = max(2, window)
    if len(curve) < window + 1:
        return False
    tail = curve[-window:]
    last = tail[-1]
    if not all(math.isfinite(v) and v > 0 for v in tail):
        return False
    if last <= curve[0] * (1 + tolerance):
        return False
    return (max(tail) - min(tail)) / last < tolerance


def stop_step(curve: Sequence[float], budget: int, window: int, tolerance: float) -> tuple[int, bool]:
    """Replay a whole curve through the detector: (steps the probe runs, whether it settled)."""
    for n in range(1, min(len(curve), budget) + 1):
        if is_settled(curve[:n], window, tolerance):
            return n, True
    return min(len(curve), budget), False


# ------------------------------------------------------------------------------ the probe
@dataclass
class ProbeResult:
    lr: float  # the U-Net learning rate found (d x lr of the U-Net group at the last step)
    te_lr: float | None  # the text-encoder lr to train with; None: derive it from lr as usual
    steps: int
    budget: int
    settled: bool
    optimizer: str  # dadaptation | prodigy
    curves: dict[str, list[float]] = field(default_factory=dict)  # group -> d x lr per step
    losses: list[float] = field(default_factory=list)
    plot_path: Path | None = None
    seconds: float = 0.0

    def to_metadata(self) -> dict[str, str]:
        info = {
            "optimizer": self.optimizer, "lr": self.lr, "te_lr": self.te_lr, "steps": self.steps,
            "budget": self.budget, "settled": self.settled, "seconds": round(self.seconds, 2),
            "probe_lrs": {"unet": PROBE_UNET_LR, "textencoder": PROBE_TE_LR},
        }  # fmt: skip
        return {METADATA_KEY: json.dumps(info, sort_keys=True)}

    def describe(self) -> str:
        how = (
            f"settled after {self.steps} steps"
            if self.settled
            else f"did not settle within its budget of {self.budget} steps, so the value is less certain"
        )
        return f"Learning rate found: {self.lr:.3g} (U-Net), {how}."


def _snapshot(rs: RunState) -> dict[str, Any]:
    state = {k: v.detach().clone() for k, v in rs.network.state_dict().items()}
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"state": state, "rng": rng}


def _restore(rs: RunState, snap: dict[str, Any]) -> None:
    with torch.no_grad():
        for k, v in rs.network.state_dict().items():
            v.copy_(snap["state"][k])
    for p in rs.network.parameters():
        p.grad = None
    torch.set_rng_state(snap["rng"]["cpu"])
    if "cuda" in snap["rng"]:
        torch.cuda.set_rng_state_all(snap["rng"]["cuda"])


def probe_config(cfg: TrainConfig) -> TrainConfig:
    """The settings the probe trains with: the run's, with the adaptive optimizer at a constant LR."""
    return dataclasses.replace(cfg, optimizer=cfg.probe_optimizer, lr_scheduler="constant")


def run_probe(
    rs: RunState, cfg: TrainConfig, events: RunEvents, build_optimizer: BuildOptimizer, train_step: TrainStep
) -> tuple[ProbeResult, torch.optim.Optimizer]:
    """Probe on a run past `build_network()`; returns the result and the probe's optimizer.

    The loop's own `build_optimizer` (given `probe_config(cfg)` and the probe's lrs) and
    `train_step` do the work, so the probe trains exactly as the loop does. Afterwards the LoRA
    weights and torch's RNG are back at their initial state; the run state's optimizer fields
    are left for the loop's next `build_optimizer` to replace.
    """
    import time

    from lib_lora.training import data as data_mod

    budget = probe_budget(rs.plan.total_steps, cfg.probe_fraction, cfg.probe_min_steps, cfg.probe_max_steps)
    events.phase(
        f"Finding the learning rate: {cfg.probe_optimizer} at lr {PROBE_UNET_LR:g} (text encoder "
        f"{PROBE_TE_LR:g}), up to {budget} steps"
    )
    snap = _snapshot(rs)
    t0 = time.time()
    writer = _writer(rs.run_dir / "logs" / "probe")
    curves: dict[str, list[float]] = {}
    losses: list[float] = []
    settled = False
    try:
        build_optimizer(probe_config(cfg), PROBE_UNET_LR, PROBE_UNET_LR)
        opt = rs.optimizer
        for g in opt.param_groups:
            if g.get("name") == "textencoder" and "layer_scale" in g:
                g["layer_scale"] = PROBE_TE_LR / PROBE_UNET_LR
        key = "unet" if rs.unet_params else "textencoder"
        step = 0
        for batch in data_mod.iter_batches(rs.dataset.items, cfg, budget, cfg.seed):
            check_cancel(events.progress)
            loss = float(train_step(batch))  # one host sync per probe step: the probe is short
            step += 1
            lrs = group_lrs(opt)
            for name in ("unet", "textencoder"):
                if f"{name}_d*lr" in lrs:
                    curves.setdefault(name, []).append(lrs[f"{name}_d*lr"])
            losses.append(loss)
            if not math.isfinite(loss):
                from lib_lora.errors import UserError

                raise UserError(
                    f"The loss became {loss} during the learning-rate probe (step {step}): train in bf16 "
                    "or fp32 instead of fp16, or give a number as --lr."
                )
            dlr = curves[key][-1]
            _log_step(writer, step, lrs, loss, sum(losses) / len(losses))
            events.emit("probe", step=step, dlr=dlr, loss=loss, budget=budget)
            if events.progress is not None:
                events.progress.update(step, budget, PROBE_LABEL)  # d*lr itself is in the 'probe' event
            if is_settled(curves[key], cfg.probe_window, cfg.probe_tolerance):
                settled = True
                break
    finally:
        if writer is not None:
            writer.close()
        _restore(rs, snap)
    found = curves[key][-1]
    if not found > curves[key][0]:
        from lib_lora.errors import UserError

        raise UserError(
            f"The learning-rate probe's d x lr did not move from its start value in {step} steps, so it "
            "found nothing: raise --probe-max-steps (or --probe-min-steps), or give a number as --lr."
        )
    if key == "unet":
        lr, te_lr = found, None
    else:  # only the text encoder trains: its own d x lr is its lr
        lr, te_lr = found, found
    result = ProbeResult(
        lr=lr, te_lr=te_lr, steps=step, budget=budget, settled=settled, optimizer=cfg.probe_optimizer,
        curves=curves, losses=losses, seconds=time.time() - t0,
    )  # fmt: skip
    atomic_write_json(rs.run_dir / CURVE_NAME, dataclasses.asdict(result) | {"plot_path": None})
    try:
        result.plot_path = plot_probe(result, rs.run_dir / PLOT_NAME)
    except Exception as err:  # noqa: BLE001 - the plot is for people; the value stands without it
        events.phase(f"The learning-rate plot could not be drawn ({type(err).__name__}: {err}).")
    return result, opt


def _writer(log_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(log_dir))
    except Exception as err:  # noqa: BLE001 - TensorBoard is a convenience, never a blocker
        log.info("TensorBoard logging of the probe is off (%s)", err)
        return None


def _log_step(writer: Any, step: int, lrs: dict[str, float], loss: float, average: float) -> None:
    """kohya's scalar names, so the curves look as they do in the tutorial's TensorBoard."""
    if writer is None:
        return
    writer.add_scalar("loss/current", loss, step)
    writer.add_scalar("loss/average", average, step)
    for name in ("unet", "textencoder"):
        if name in lrs:
            writer.add_scalar(f"lr/{name}", lrs[name], step)
        if f"{name}_d*lr" in lrs:
            writer.add_scalar(f"lr/d*lr/{name}", lrs[f"{name}_d*lr"], step)


def plot_probe(result: ProbeResult, path: Path) -> Path:
    """A PNG of d x lr per step with the chosen value marked (Agg backend; no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    labels = {"unet": "U-Net d×lr", "textencoder": "text encoder d×lr"}
    for name, curve in result.curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=labels.get(name, name))
    ax.axhline(result.lr, color="tab:red", linestyle="--", linewidth=1, label=f"chosen lr {result.lr:.3g}")
    ax.axvline(result.steps, color="gray", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("probe step")
    ax.set_ylabel("d × lr")
    state = "settled" if result.settled else f"budget reached ({result.budget} steps): less certain"
    ax.set_title(f"Learning-rate probe ({result.optimizer}): {result.lr:.3g}, {state}")
    ax.legend(loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# ------------------------------------------------------------------------------ what the loop calls
def auto_lr(
    rs: RunState, cfg: TrainConfig, events: RunEvents, build_optimizer: BuildOptimizer, train_step: TrainStep
) -> tuple[float, float | None]:
    """(U-Net lr, text-encoder lr or None) for `lr = auto`.

    An adaptive optimizer (prodigy, dadaptation) needs no probe: it adapts all the way, at the
    tutorial's lr 1.0 for every group (both optimizers refuse different lrs per group; set
    text_encoder_lr to override). Otherwise the probe runs and the real optimizer gets
    lr = found, text encoder = found x te_lr_ratio.
    """
    if cfg.optimizer in ADAPTIVE:
        events.phase(f"{cfg.optimizer} adapts its own step size: no probe, lr {PROBE_UNET_LR:g} (d x lr is logged).")
        return PROBE_UNET_LR, PROBE_UNET_LR
    result, _ = run_probe(rs, cfg, events, build_optimizer, train_step)
    rs.probe_result = result
    rs.extra_metadata.update(result.to_metadata())
    where = f" Plot: {result.plot_path}" if result.plot_path else ""
    # An unsettled probe is a warning: its value is less certain (the CLI prints it either way).
    (events.phase if result.settled else events.warn)(result.describe() + where)
    events.emit(
        "probe_done", lr=result.lr, te_lr=result.te_lr, steps=result.steps, budget=result.budget,
        settled=result.settled, plot=str(result.plot_path) if result.plot_path else None,
    )  # fmt: skip
    return result.lr, result.te_lr
