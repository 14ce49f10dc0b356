"""Data-parallel training over several processes (GPUs, machines), through accelerate and DDP.

`accelerate launch -m lib_lora train ...` or `torchrun --nproc_per_node N -m lib_lora train ...`
starts N copies of the trainer; the launcher's environment says where the others are.
`start()` joins them into one process group with accelerate's `PartialState` (nccl between
GPUs, gloo between CPUs), and the loop trains data-parallel:

- One run, whatever the process count: the step plan, the data order and the noise are those
  of one process training the global batch (`--batch-size` x processes). Every process walks
  the same global batches and draws the whole batch's noise and timesteps from the same
  seeded generator, then trains only its share of the samples (`share_bounds`). So the saved
  state does not depend on how many processes made it, and a run resumes on another process
  count as long as the global batch stays the same.
- Gradients are averaged by torch's DistributedDataParallel. A process's loss is weighted by
  its share of the batch times the process count, so DDP's plain mean over processes is the
  mean over the global batch even where a bucket's last batch does not split evenly; a process
  with no sample in a batch trains a copy of one at weight 0, to take part in the all-reduce.
- Only the main process writes: the run folder, events, TensorBoard, samples, checkpoints,
  state and the LoRA. The others wait where they need what it wrote (`main_first`) or for
  its outcome (`main_only`: the folder checks, the resume read, the probe, each checkpoint,
  sample and state save, the export), and otherwise at DDP's next all-reduce.
- An error on one process reaches all of them: each such step ends in `agree`, a gather of
  every process's outcome, so a refusal on the main process (an unreadable state, a full
  disk) stops every process with its one sentence, instead of leaving the others at the next
  collective (with NCCL they would wait there until the timeout; with gloo they stop saying
  a peer was lost).
- The run folder's config.json holds the global batch, marked with `processes`, and the
  device kind (`run_config_values`): `--config` of it gives the same run under any launcher
  whose process count divides the batch (config_files.file_config), and in one process.
- `--lr auto`: the probe runs once, on the main process alone, and its value is broadcast.
- The non-finite guard decides on an agreed gradient norm: non-finite on every process when
  it is on any, so all of them skip the same steps and stop at the same one.
- A stop (a signal, a lost peer) keeps the last periodic state (`--state-every-n-steps`) and
  writes nothing more: a process can be stopped in the middle of a collective, where the
  step's draws are half made, so resuming there would not be exact. That is what a kill -9
  of a one-process run leaves too.

Functions over the run's state (`run_state.RunState`: `procs`, `ddp`); nothing here imports
the loop. accelerate is imported only when several processes run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lib_lora.errors import Cancelled, UserError

if TYPE_CHECKING:
    from lib_lora.config import TrainConfig
    from lib_lora.training.data import Batch
    from lib_lora.training.run_state import RunEvents, RunState
    from lib_lora.training.speed import StepData

# The launchers' environment: torchrun and `accelerate launch` set WORLD_SIZE, MPI launchers theirs.
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass
class Processes:
    """Which process of how many this one is; one process (rank 0 of 1) unless `start()` joined a group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # this process's device, from accelerate
    accel: Any = None  # accelerate's PartialState while several processes run
    # False while the main process trains alone (the LR probe): no collective then.
    data_parallel: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world > 1


def launched_processes(env: dict[str, str] | None = None) -> int:
    """How many processes the launcher started (1 when none did)."""
    env = os.environ if env is None else env
    for var in WORLD_SIZE_VARS:
        try:
            n = int(env.get(var, ""))
        except ValueError:
            continue
        return max(1, n)
    return 1


def start(cpu: bool = False) -> Processes:
    """Join the launcher's process group (accelerate's PartialState); one process when not launched."""
    if launched_processes() <= 1:
        return Processes()
    from accelerate import PartialState

    st = PartialState(cpu=cpu)
    device = torch.device(st.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # collectives and "cuda" tensors go to this process's GPU
    return Processes(rank=st.process_index, world=st.num_processes, local_rank=st.local_process_index,
                     device=device, accel=st)  # fmt: skip


def stop(procs: Processes) -> None:
    """Leave the process group (at the end of the command)."""
    if procs.many and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def global_config(cfg: TrainConfig, procs: Processes) -> TrainConfig:
    """The config every process trains: the global batch (batch size x processes), which
    defines the step plan, the data order and the saved state; each process on its own device.
    The out-of-memory retry is off: one process retrying a step the others have taken would
    leave them waiting in the all-reduce."""
    if not procs.many:
        return cfg
    device = cfg.device
    if cfg.device.startswith("cuda:"):
        raise UserError(f"--device {cfg.device} names one GPU, but {procs.world} processes run: each takes its "
                        "own GPU, so leave --device at auto (or cuda).")
    if procs.device is not None and procs.device.type == "cuda" and cfg.device in ("auto", "cuda"):
        device = str(procs.device)
    elif cfg.device == "auto":
        device = "cpu"
    if cfg.module_dropout > 0:
        # A module sitting a step out leaves its LoRA without a gradient, and DDP's reduction
        # waits for every parameter: the next step would fail on every process.
        raise UserError(f"--module-dropout {cfg.module_dropout} cannot train on {procs.world} processes (a skipped "
                        "module gets no gradient to average); set it to 0 or train in one process.")
    batch = cfg.batch_size * procs.world
    if batch > 256:
        raise UserError(f"--batch-size {cfg.batch_size} on {procs.world} processes is a global batch of {batch}; "
                        "the most is 256, so lower --batch-size.")
    return dataclasses.replace(cfg, batch_size=batch, device=device, oom_retry=False)


def run_config_values(values: dict[str, Any], procs: Processes) -> dict[str, Any]:
    """What the run folder's config.json holds (`values`: the config every process trains, as a
    dict), made to give the same run again through `--config` under any launcher: its
    batch_size is the global batch, marked by `processes` (config_files.file_config then splits
    it over the processes of the new command), the device is the kind, not the main
    process's own GPU (each process takes its own again; one process takes the GPU), and
    oom_retry, which several processes always turn off (global_config), is left to the new
    command."""
    if not procs.many:
        return values
    from lib_lora.config_files import PROCESSES_KEY

    device = str(values.get("device", "auto"))
    kept = {k: v for k, v in values.items() if k != "oom_retry"}
    return {**kept, "device": device.split(":")[0], PROCESSES_KEY: procs.world}


def metadata(procs: Processes, cfg: TrainConfig) -> dict[str, str]:
    """The LoRA's batch keys when several processes trained it (cfg holds the global batch)."""
    if not procs.many:
        return {}
    return {"ss_batch_size_per_device": str(cfg.batch_size // procs.world),
            "ss_total_batch_size": str(cfg.batch_size), "fastlora_processes": str(procs.world)}  # fmt: skip


def _sentence(err: BaseException, rank: int) -> str:
    """What the other processes say for `err`: a UserError's own sentence, else its kind and text."""
    if isinstance(err, UserError):
        return str(err)
    who = "The main process" if rank == 0 else f"Process {rank}"
    return f"{who} stopped on an error ({type(err).__name__}: {err}); the others stopped with it."


def agree(procs: Processes, err: Exception | None = None) -> None:
    """Every process's outcome of the step just done, on every process (a collective: all of them
    call it at the same point). This process's own `err` is raised as it is; else the first
    error of another process is raised here as a UserError with its sentence, so an error on
    one process stops all of them with the same words instead of leaving the others waiting
    at the next collective for a process that is gone."""
    if not procs.many:
        if err is not None:
            raise err
        return
    said: list[str | None] = [None] * procs.world
    torch.distributed.all_gather_object(said, None if err is None else _sentence(err, procs.rank))
    if err is not None:
        raise err
    first = next((text for text in said if text is not None), None)
    if first is not None:
        raise UserError(first)


def together(procs: Processes, step: Callable[[], Any], here: bool = True) -> Any:
    """`step()` on the processes where `here` (the main one alone: `procs.is_main`), then `agree`:
    its value where it ran (None elsewhere), or the same error on every process."""
    value, err = None, None
    if here:
        try:
            value = step()
        except Cancelled:  # a stop, which the launcher gives every process (as Ctrl-C)
            raise
        except Exception as e:  # noqa: BLE001 - agree() raises it here, and its sentence on the others
            err = e
    agree(procs, err)
    return value


def main_only(procs: Processes, step: Callable[[], Any]) -> Any:
    """`step()` on the main process (a write), its error on every process; the others wait."""
    if not procs.many:
        return step()
    return together(procs, step, here=procs.is_main)


@contextlib.contextmanager
def main_first(procs: Processes, when: bool = True) -> Iterator[None]:
    """The main process runs the block first (it writes, e.g. the latent cache); the others then
    (and find what it wrote). An error in the block on any process stops every process (agree)."""
    if not (procs.many and when):
        yield
        return
    # Two agreements on every process: after the main process's block, after the others'.
    if not procs.is_main:
        agree(procs)  # the main process's block is done (or failed: its error is raised here)
    try:
        yield
    except Cancelled:
        raise
    except Exception as err:
        agree(procs, err)
        raise
    if procs.is_main:
        agree(procs)  # its block is done: the others' turn
    agree(procs)  # the others' block is done


def broadcast(procs: Processes, value: Any) -> Any:
    """The main process's `value` (any picklable object), on every process."""
    if not procs.many:
        return value
    box = [value if procs.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------- set-up the loop calls
def load_for_resume(rs: RunState, cfg: TrainConfig, events: RunEvents,
                    load: Callable[[RunState, TrainConfig, RunEvents], dict | None]) -> dict | None:
    """`load` (state.load_for_resume: clean-up, --restart, read) on the main process; the others
    read the state it left, after it (they never remove anything). A refusal on any process
    (an unreadable state) stops all of them with its sentence; so does a process that does not
    find the state the main one resumes (another machine whose run folder is not the same)."""
    procs = rs.procs
    if not procs.many:
        return load(rs, cfg, events)
    st = main_only(procs, lambda: load(rs, cfg, events))
    from lib_lora.training.state import load_state, state_path

    path = state_path(rs.run_dir)

    def read() -> dict | None:
        return load_state(path) if path.is_file() else None

    got = together(procs, read, here=not procs.is_main)
    mine = st if procs.is_main else got
    main_step = broadcast(procs, None if st is None else int(st["step"]))
    step = None if mine is None else int(mine["step"])
    problem = None
    if step != main_step:
        found = "no saved state" if step is None else f"a saved state at step {step}"
        at = "starts over" if main_step is None else f"resumes at step {main_step}"
        problem = UserError(f"The main process {at}, but process {procs.rank} finds {found} in {path}: every "
                            "machine needs the same run folder (a shared file system); start over with --restart "
                            "if it cannot have it.")
    agree(procs, problem)
    return mine


def probe_once(rs: RunState, probe: Callable[[], tuple[float, float | None]]) -> tuple[float, float | None]:
    """`probe()` (the LR probe) on the main process alone, training the global batch there; every
    process gets its value and the metadata it adds. A failed probe stops every process with
    its sentence (main_only)."""
    procs = rs.procs
    if not procs.many:
        return probe()

    def alone() -> tuple:
        procs.data_parallel = False
        try:
            return probe(), dict(rs.extra_metadata)
        finally:
            procs.data_parallel = True

    value, extra = broadcast(procs, main_only(procs, alone))
    rs.extra_metadata.update(extra)
    return value


# ---------------------------------------------------------------- one data-parallel step
def parallel(rs: RunState) -> bool:
    return rs.procs.many and rs.procs.data_parallel


def share_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Samples [lo, hi) of a batch of `n` that process `rank` of `world` trains: contiguous and
    as even as can be (the first n % world processes take one more; some take none when n < world)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def share(n: int, rank: int, world: int) -> tuple[int, int, float]:
    """(lo, hi, weight): the samples this process trains and the weight of their mean loss. DDP
    divides the summed gradients by `world`, so a weight of (hi - lo) x world / n makes the result
    the mean over all n samples; a process without a sample gets weight 0."""
    lo, hi = share_bounds(n, rank, world)
    return lo, hi, (hi - lo) * world / n


def slice_step(d: StepData, lo: int, hi: int) -> StepData:
    """Rows [lo, hi) of every per-sample tensor of a step's inputs."""
    return dataclasses.replace(d, **{f.name: getattr(d, f.name)[lo:hi] for f in dataclasses.fields(d)
                                     if isinstance(getattr(d, f.name), torch.Tensor)})  # fmt: skip


class _Predict(torch.nn.Module):
    """What DDP wraps: the U-Net's prediction, with the LoRA as its parameters (the backbone's
    frozen weights are not this module's, so DDP neither broadcasts nor watches them)."""

    def __init__(self, network: torch.nn.Module, predict: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.network = network
        self.__dict__["predict"] = predict  # a plain callable, not a submodule

    def forward(self, *args: Any) -> torch.Tensor:
        return self.predict(*args)


def wrap_predict(rs: RunState) -> None:
    """Route the loop's U-Net call through DDP, so the LoRA's gradients are averaged in backward
    (DDP starts each step's reduction in its forward). Built once; DDP broadcasts the main
    process's LoRA weights to the others when it is built."""
    if rs.ddp is not None:
        return
    from torch.nn.parallel import DistributedDataParallel

    plain = rs.predict
    ids = [rs.device] if rs.device.type == "cuda" else None
    rs.ddp = DistributedDataParallel(_Predict(rs.network, plain), device_ids=ids)
    rs.predict = rs.ddp


def train_share(rs: RunState, batch: Batch, step_inputs: Callable[[Batch], StepData],
                backward: Callable[[StepData, float], torch.Tensor], optimizer_step: Callable[[], None]) -> torch.Tensor:
    """One optimisation step of the global `batch`, this process training its share; returns
    the global batch's mean loss (the same value on every process)."""
    d = step_inputs(batch)  # the whole batch's draws, as one process makes them
    wrap_predict(rs)
    n = len(batch.items)
    lo, hi, weight = share(n, rs.procs.rank, rs.procs.world)
    mine = hi - lo
    part = slice_step(d, lo, hi) if mine else slice_step(d, 0, 1)  # no sample: a copy of one, at weight 0
    loss = backward(part, weight)
    optimizer_step()
    total = loss * (mine / n)
    torch.distributed.all_reduce(total)  # sum of the shares' weighted means: the batch's mean
    return total


def agreed_norm(rs: RunState, norm: torch.Tensor | None, params: list[torch.Tensor]) -> torch.Tensor | None:
    """The gradient norm the non-finite guard reads: made non-finite on every process when it is
    on any, so all processes skip (or take) the same optimizer step."""
    if not parallel(rs):
        return norm
    if norm is None:
        from lib_lora.training.guards import total_grad_norm

        norm = total_grad_norm(params)
        if norm is None:
            return None
    finite = torch.isfinite(norm).float()
    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return torch.where(finite > 0, norm, torch.full_like(norm, float("nan")))


def writes(rs: RunState) -> bool:
    """Whether this process writes the run's files (the main one)."""
    return rs.procs.is_main


def lost_peer(err: BaseException) -> UserError | None:
    """A user's sentence for a collective that failed because another process stopped; None for
    any other error."""
    text = str(err)
    signs = ("Connection closed by peer", "Connection reset by peer", "NCCL", "Gloo", "gloo", "Broken pipe",
             "ProcessGroup", "DistBackendError", "Socket Timeout")
    if not any(s in text for s in signs) and type(err).__name__ != "DistBackendError":
        return None
    return UserError("Another training process stopped, so this one stopped too; start the same command again "
                     "to resume from the last saved state.")


def single_process_note(asked: int | None = None, who: str = "The WebUI") -> str | None:
    """For a host that trains in its own process (the WebUI, the web UI): the sentence to say when
    it was started under a multi-process launcher (or `asked` for more processes); None otherwise."""
    n = launched_processes() if asked is None else asked
    if n <= 1:
        return None
    return (f"{who} trains in a single process on one GPU ({n} processes were started); to train on several "
            "GPUs, run Fast LoRA's command-line trainer under accelerate launch (see docs/MULTI_GPU.md).")
