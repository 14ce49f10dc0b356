"""Resumable training state: everything needed to continue a run at the exact step.

One file, `<run dir>/state/state.pt`, written atomically (temporary name, fsync, rename), so
after kill -9 or a full disk the folder holds either the previous complete state or the new
one. It holds the LoRA weights (fp32), the optimizer, scheduler and grad-scaler states, every
RNG the loop draws from (torch CPU and CUDA, numpy, python, the loop's noise generator), the
step and epoch, a digest of the data order, the learning rate the probe found, and a
fingerprint of the config. It is read back with `torch.load(weights_only=True)`: plain
tensors and containers only, never arbitrary pickled objects.

Starting the same command again resumes at the saved step and says so; `--restart` discards
the state and starts over; a state whose config or data no longer match is refused with a
message, never silently mixed with a different run.

Functions over the run's state (`run_state.RunState`) and its config, passed in by the loop;
nothing here imports the loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lib_lora.atomic import atomic_path, cleanup_stale_temps
from lib_lora.config import to_dict
from lib_lora.errors import UserError, file_error, is_file_error

if TYPE_CHECKING:
    from lib_lora.config import TrainConfig
    from lib_lora.training.run_state import RunEvents, RunState

STATE_DIR = "state"
STATE_FILE = "state.pt"
FORMAT = 1

# Fields that do not change what is trained: a resumed run may differ in these. They name or
# place the outputs (save_precision only rounds the exported copy; the state keeps fp32), set
# how often things are saved, logged or sampled, or trade speed for memory.
NEUTRAL_FIELDS = frozenset({
    "name", "output_dir", "run_dir", "overwrite", "save_precision", "device", "save_every_n_steps", "save_every_n_epochs",
    "log_every_n_steps", "comment", "cache_latents_to_disk", "restart", "state_every_n_steps",
    "max_nonfinite_steps", "oom_retry", "gradient_checkpointing", "cache_text_encoder_outputs",
    "channels_last", "compile_unet", "sample_images", "sample_every_n_steps",
    "sample_every_n_epochs", "sample_prompts", "sample_negative_prompt", "sample_steps", "sample_cfg_scale",
})  # fmt: skip


class ResumeError(UserError):
    """A saved state that cannot be used for this run."""


def state_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / STATE_DIR / STATE_FILE


def fingerprint(cfg: Any) -> dict[str, Any]:
    """The config fields that decide the trained weights (JSON-safe values)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in NEUTRAL_FIELDS}


DATA_DIGEST = 2  # what data_digest covers: 2 adds the mask files


def data_digest(rs: RunState, cfg: TrainConfig) -> str:
    """Digest of the data order's inputs: images (content), captions, buckets, repeats, seed,
    and with masked_loss each image's mask file (content, as the run read it: `rs.mask_digests`).

    The order itself is a pure function of these (`data.epoch_batches` seeds per epoch), so
    equal digests mean the resumed run walks the same batches from the saved step on; a mask
    changed in between would weigh the rest of the run's loss differently."""
    h = hashlib.sha256()
    h.update(str(cfg.seed).encode())
    masks = rs.mask_digests if cfg.masked_loss else None
    for it in rs.dataset.items:
        h.update(json.dumps([it.digest, it.caption, it.repeats, list(it.bucket), it.subset]).encode())
        if masks is not None:  # "" without a mask file (an alpha mask is in the image's digest)
            h.update(masks.get(id(it), "").encode())
    return h.hexdigest()


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}  # fmt: skip


def _set_numpy_state(s: dict[str, Any]) -> None:
    keys = s["keys"].numpy().astype(np.uint32)
    np.random.set_state((s["name"], keys, s["pos"], s["has_gauss"], s["cached"]))


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_state(s: list[Any]) -> None:
    random.setstate((s[0], tuple(s[1]), s[2]))


def capture(rs: RunState, cfg: TrainConfig) -> dict[str, Any]:
    """The run's state as plain tensors and containers (loadable with weights_only)."""
    spe = max(1, rs.plan.steps_per_epoch)
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": _python_state(),
        "noise": rs.noise_gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "format": FORMAT,
        "saved_at": time.time(),
        "step": rs.step,
        "epoch": rs.step // spe,
        "total_steps": rs.total_steps,
        "started_at": rs.started_at,
        "session_id": rs.session_id,
        "final_loss": float(rs.final_loss),
        "config": json.dumps(fingerprint(cfg), sort_keys=True, default=str),
        "data": data_digest(rs, cfg),
        "data_digest": DATA_DIGEST,
        "probe": {"unet_lr": float(rs.unet_lr), "te_lr": float(rs.te_lr)},
        "extra_metadata": dict(rs.extra_metadata),
        "network": {k: v.detach().to("cpu").clone() for k, v in rs.network.state_dict().items()},
        "optimizer": rs.optimizer.state_dict(),
        "scheduler": rs.scheduler.state_dict(),
        "scaler": rs.scaler.state_dict() if rs.scaler is not None else None,
        "rng": rng,
    }


def nonfinite_tensors(obj: Any, where: str = "") -> list[str]:
    """Where `obj` (a state, or any nest of dicts, lists and tensors) holds NaN or infinity."""
    if isinstance(obj, torch.Tensor):
        return [where] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, dict):
        return [w for k, v in obj.items() for w in nonfinite_tensors(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, list | tuple):
        return [w for i, v in enumerate(obj) for w in nonfinite_tensors(v, f"{where}[{i}]")]
    return []


def save_state(rs: RunState, cfg: TrainConfig, events: RunEvents) -> Path:
    """Write the resumable state atomically; the previous state stays intact if this fails.
    A state whose weights or optimizer moments hold NaN/inf is never written: resuming it could
    only give a broken LoRA, and it would replace the last good one."""
    path = state_path(rs.run_dir)
    obj = capture(rs, cfg)
    bad = nonfinite_tensors({"network": obj["network"], "optimizer": obj["optimizer"]})
    if bad:
        from lib_lora.training.guards import NonFiniteError

        kept = f"the last good state in {path.parent} was kept" if path.is_file() else "no state was saved"
        raise NonFiniteError(
            f"The LoRA's weights or optimizer state became NaN/inf by step {rs.step} ({len(bad)} tensors, "
            f"e.g. {bad[0]}), so {kept} and no LoRA was written; lower the learning rate or alpha, or turn "
            "max_grad_norm on, and start the run over."
        )
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except Exception as err:
        if not is_file_error(err):  # torch reports a failed write as a RuntimeError
            raise
        raise file_error(err, path, "save the run's state to", then="then start the same training again: it "
                         "resumes from the previous state, which is intact") from None
    events.emit("state", path=str(path), step=rs.step)
    return path


def load_state(path: str | Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable state gets the same advice
        raise ResumeError(
            f"The saved state {path} cannot be read ({type(err).__name__}); start the run over with --restart."
        ) from err
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ResumeError(f"The saved state {path} is from another version; start over with --restart.")
    return obj


def _config_diff(saved: str, now: dict[str, Any]) -> list[str]:
    """The fields whose values differ. A field the saved state lacks was added to the schema
    since it was written: the stopped run trained with that field's default, so it differs
    only when the value now is not the default."""
    from lib_lora.config import TrainConfig

    old = json.loads(saved)
    now = json.loads(json.dumps(now, sort_keys=True, default=str))
    defaults = json.loads(json.dumps(fingerprint(TrainConfig()), sort_keys=True, default=str))
    return sorted(k for k in set(old) | set(now) if old.get(k, defaults.get(k)) != now.get(k))


def check_compatible(rs: RunState, cfg: TrainConfig, st: dict[str, Any], path: Path) -> None:
    diff = _config_diff(st["config"], fingerprint(cfg))
    if diff:
        raise ResumeError(
            f"The run folder {rs.run_dir} holds a stopped run with different settings "
            f"({', '.join(diff[:6])}). Start it with the same settings to resume, start over with --restart, "
            "or give another name."
        )
    # The optimizer's state is matched to the parameters by position: a network whose modules
    # come in another order (an earlier version's) would take another module's moments.
    if list(st["network"]) != list(rs.network.state_dict()):
        raise ResumeError(f"The saved state {path} holds the LoRA's modules in another order or set (an earlier "
                          "version made it); start over with --restart.")
    if cfg.masked_loss and st.get("data_digest", 1) != DATA_DIGEST:
        raise ResumeError(f"The saved state {path} is from an earlier version, which did not record the masks; "
                          "start over with --restart.")
    if st["data"] != data_digest(rs, cfg):
        raise ResumeError(
            f"The dataset changed since the run in {rs.run_dir} stopped (images, captions, repeats or masks). "
            "Start over with --restart to use the new data, or restore the old files to resume."
        )
    if st["total_steps"] != rs.total_steps:
        raise ResumeError(f"The saved state in {path} plans a different number of steps; start over with --restart.")


def restore(rs: RunState, st: dict[str, Any]) -> None:
    """Put the saved state back into a set-up run (network, optimizer... already built)."""
    rs.network.load_state_dict(st["network"])
    rs.optimizer.load_state_dict(st["optimizer"])
    rs.scheduler.load_state_dict(st["scheduler"])
    if rs.scaler is not None and st["scaler"]:
        rs.scaler.load_state_dict(st["scaler"])
    rng = st["rng"]
    torch.set_rng_state(rng["torch"])
    _set_numpy_state(rng["numpy"])
    _set_python_state(rng["python"])
    rs.noise_gen.set_state(rng["noise"])
    if "cuda" in rng and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # a different GPU count: CUDA RNG starts fresh
            torch.cuda.set_rng_state_all(rng["cuda"])
    rs.step = int(st["step"])
    rs.started_at = float(st["started_at"])
    rs.final_loss = float(st["final_loss"])
    rs.extra_metadata.update(st.get("extra_metadata", {}))
    if st.get("session_id"):
        rs.session_id = st["session_id"]


# ---------------------------------------------------------------- what the loop calls


def load_for_resume(rs: RunState, cfg: TrainConfig, events: RunEvents) -> dict[str, Any] | None:
    """Before the LR is resolved: clean leftovers of a killed run, honour --restart, and read
    the saved state (if any) so a resumed run reuses the probe's value instead of probing again."""
    removed = [p for folder in (rs.run_dir, Path(cfg.output_dir))
               for p in cleanup_stale_temps(folder, recursive=True)]
    if removed:
        events.phase(f"Removed {len(removed)} temporary file(s) left by an interrupted run.")
    path = state_path(rs.run_dir)
    if not path.is_file():
        return None
    if cfg.restart:
        path.unlink()
        events.phase(f"Starting over at step 0 (--restart): discarded the saved state in {path.parent}.")
        return None
    return load_state(path)


def saved_lrs(st: dict[str, Any] | None) -> tuple[float, float] | None:
    """(U-Net lr, text-encoder lr) the stopped run trained with, e.g. found by its LR probe."""
    if not st or "probe" not in st:
        return None
    return float(st["probe"]["unet_lr"]), float(st["probe"]["te_lr"])


def begin(rs: RunState, cfg: TrainConfig, events: RunEvents) -> None:
    """After set-up: resume from the state `load_for_resume` read, or start at step 0."""
    st = rs.resume_state
    if st is None:
        return
    path = state_path(rs.run_dir)
    check_compatible(rs, cfg, st, path)
    restore(rs, st)
    rs.resume_state = None  # the tensors are in the run now; let the copy go
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st["saved_at"]))
    events.phase(f"Resuming at step {rs.step} of {rs.total_steps} from the state saved {when} ({path}).")


def after_step(rs: RunState, cfg: TrainConfig, events: RunEvents) -> None:
    """Save the state every cfg.state_every_n_steps steps and after the last step (so a kill
    during the export resumes straight into the export)."""
    if state_due(rs, cfg):
        save_state(rs, cfg, events)


def state_due(rs: RunState, cfg: TrainConfig) -> bool:
    """Whether after_step saves the state at this step."""
    n = cfg.state_every_n_steps
    return bool(n and rs.step % n == 0) or rs.step == rs.total_steps


def on_stop(rs: RunState, cfg: TrainConfig, events: RunEvents) -> None:
    """On a user's stop: keep the current state so the same command resumes here."""
    if rs.optimizer is not None and rs.step > 0:
        save_state(rs, cfg, events)


def written_export(run_dir: Path, cfg: TrainConfig, lora_path: Path) -> dict[str, Any] | None:
    """The saved state of a run that already wrote `lora_path` and was stopped before it
    finished the export (card files, state clean-up); None for any other file there.

    The final state is saved after the last step and removed only once the card files are
    written, so a kill between the LoRA's rename and that point leaves both. The LoRA is this
    run's when its header carries the state's session id, the state is at its last step and
    the settings are the same; then the same command completes the export instead of refusing
    a file it wrote itself."""
    path = state_path(run_dir)
    if cfg.restart or not (lora_path.is_file() and path.is_file()):
        return None
    from lib_lora.training.export import read_metadata

    try:
        session = read_metadata(lora_path).get("ss_session_id")
        st = load_state(path)
    except (OSError, ValueError, struct.error, UserError):
        return None  # unreadable either way: not provably ours, so the usual refusal applies
    if not session or st.get("session_id") != session or st.get("step") != st.get("total_steps"):
        return None
    if _config_diff(st["config"], fingerprint(cfg)):
        return None
    return st


def finish(run_dir: Path) -> None:
    """After the final LoRA and its card files are written: the state has served its purpose."""
    with contextlib.suppress(FileNotFoundError):
        state_path(run_dir).unlink()
