"""The pieces of data-parallel training that need no model: how a batch is shared out, and the
non-finite guard's agreement between processes (2 real gloo processes, spawned)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from lib_lora.errors import UserError
from lib_lora.training import distributed
from lib_lora.training.run_state import RunState
from lib_lora.training.speed import StepData


@pytest.mark.parametrize("n,world", [(1, 2), (2, 2), (3, 2), (5, 3), (7, 4), (4, 1)])
def test_shares_cover_the_batch_once_and_weight_to_its_mean(n, world):
    shares = [distributed.share(n, r, world) for r in range(world)]
    bounds = [(lo, hi) for lo, hi, _ in shares]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))  # contiguous, no overlap
    assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1
    # DDP's mean over processes of (weight x share mean) is the batch mean for any per-sample losses.
    losses = torch.arange(1.0, n + 1) ** 2
    ddp_mean = sum(w * (losses[lo:hi].mean() if hi > lo else losses[0]) for lo, hi, w in shares) / world
    assert float(ddp_mean) == pytest.approx(float(losses.mean()), rel=1e-6)
    assert all(w == 0 for lo, hi, w in shares if hi == lo)  # the copy a process without a sample trains adds nothing


def test_a_step_slice_takes_the_same_rows_of_every_tensor():
    d = StepData(latents=torch.arange(4.0).view(4, 1, 1, 1), noise=torch.arange(4.0).view(4, 1, 1, 1) + 10,
                 timesteps=torch.arange(4), ids=torch.arange(8).view(4, 2), cond=None)
    part = distributed.slice_step(d, 1, 3)
    assert part.timesteps.tolist() == [1, 2] and part.ids.tolist() == [[2, 3], [4, 5]]
    assert part.noise.flatten().tolist() == [11.0, 12.0] and part.cond is None


def _on_two_processes(fn, *args) -> dict:  # noqa: ANN001
    """`fn(rank, port, *args, out)` in two real spawned processes, one gloo group; `out` as each left it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(fn, args=(port, *args, out), nprocs=2, join=True)
        return dict(out)


CASES = [[1.5, float("inf")], [float("nan"), 2.0], [1.5, 2.5]]  # (rank 0's norm, rank 1's)


def _agree(rank: int, port: int, out: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rs = RunState(procs=distributed.Processes(rank=rank, world=2))
        out[rank] = [float(distributed.agreed_norm(rs, torch.tensor(norms[rank]), [])) for norms in CASES]
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(300)
def test_the_guard_sees_a_non_finite_norm_on_every_process_when_one_has_it():
    got = _on_two_processes(_agree)
    for i, norms in enumerate(CASES):
        if all(torch.isfinite(torch.tensor(norms))):
            assert (got[0][i], got[1][i]) == tuple(norms)  # a finite norm is left as it is
        else:
            assert got[0][i] != got[0][i] and got[1][i] != got[1][i]  # NaN on both: both skip the step


def test_module_dropout_is_refused_on_several_processes_and_the_global_batch_is_set():
    from lib_lora.config import TrainConfig
    from lib_lora.errors import UserError

    two = distributed.Processes(rank=0, world=2)
    cfg = TrainConfig(name="x", dataset="d", device="cpu", batch_size=3)
    assert distributed.global_config(cfg, two).batch_size == 6
    with pytest.raises(UserError, match="module-dropout 0.1 cannot train on 2 processes"):
        distributed.global_config(TrainConfig(name="x", dataset="d", device="cpu", module_dropout=0.1), two)
    one = TrainConfig(name="x", dataset="d", device="cpu", module_dropout=0.1)
    assert distributed.global_config(one, distributed.Processes()) is one


def _outcome(fn) -> str:  # noqa: ANN001
    try:
        return f"ok {fn()!r}"
    except Exception as err:  # noqa: BLE001 - the test compares what each process raised
        return f"{type(err).__name__}: {err}"


def _in_block(procs: distributed.Processes, fail_on: int | None, ran: list[int]) -> None:
    with distributed.main_first(procs):
        ran.append(procs.rank)
        if procs.rank == fail_on:
            raise UserError(f"the block failed on process {fail_on}.")


def _errors(rank: int, port: int, out: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        procs = distributed.Processes(rank=rank, world=2)

        def refuse() -> None:
            raise UserError("The saved state cannot be read; start over with --restart.")

        def bug() -> None:
            raise ValueError("a bug")

        got = [_outcome(lambda: distributed.main_only(procs, lambda: "written")),
               _outcome(lambda: distributed.main_only(procs, refuse)),
               _outcome(lambda: distributed.main_only(procs, bug))]  # fmt: skip
        for fail_on in (None, 0, 1):
            ran: list[int] = []
            got.append(_outcome(lambda: _in_block(procs, fail_on, ran)) + f" ran {ran}")  # noqa: B023
        # Every process made the same collectives: the next one pairs with the other's.
        got.append(repr(distributed.broadcast(procs, "still in step")))
        out[rank] = got
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(300)
def test_an_error_on_one_process_stops_every_process_with_its_sentence():
    out = _on_two_processes(_errors)
    main, other = out[0], out[1]
    assert main[0] == "ok 'written'" and other[0] == "ok None"  # the main process's value, the others wait
    assert main[1] == other[1] == "UserError: The saved state cannot be read; start over with --restart."
    assert main[2] == "ValueError: a bug"  # the main process keeps its own error (and traceback)
    assert other[2] == "UserError: The main process stopped on an error (ValueError: a bug); the others stopped with it."
    assert (main[3], other[3]) == ("ok None ran [0]", "ok None ran [1]")
    # The main process's block fails: the others never run theirs.
    assert main[4] == "UserError: the block failed on process 0. ran [0]"
    assert other[4] == "UserError: the block failed on process 0. ran []"
    # Another process's block fails (reading what the main one wrote): the main process stops too.
    assert main[5] == "UserError: the block failed on process 1. ran [0]"
    assert other[5] == "UserError: the block failed on process 1. ran [1]"
    assert main[6] == other[6] == "'still in step'"


def test_a_data_parallel_runs_config_json_reads_back_as_the_same_global_batch(tmp_path):
    import json

    from lib_lora.config import TrainConfig, to_dict
    from lib_lora.config_files import file_config, read_config_file

    # What the main process of 2 GPU processes trains (global_config): the global batch, its own GPU.
    trained = TrainConfig(name="x", dataset="d", device="cuda:0", batch_size=4)
    main = distributed.Processes(rank=0, world=2, device=torch.device("cuda:0"))
    values = distributed.run_config_values(to_dict(trained), main)
    assert (values["batch_size"], values["device"], values["processes"]) == (4, "cuda", 2)
    assert "oom_retry" not in values  # off under several processes, not a choice to carry to one
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values), encoding="utf-8")
    cf = read_config_file(path)
    alone = file_config([cf], TrainConfig(), world=1)  # one process (also the WebUI's form): the global batch
    assert (alone.batch_size, alone.device) == (4, "cuda")
    # Under 2 processes again each takes half, and global_config makes the same run, on each one's GPU.
    share = file_config([cf], TrainConfig(), world=2)
    assert share.batch_size == 2
    for rank in (0, 1):
        procs = distributed.Processes(rank=rank, world=2, device=torch.device(f"cuda:{rank}"))
        again = distributed.global_config(share, procs)
        assert (again.batch_size, again.device) == (4, f"cuda:{rank}")
    assert file_config([cf], TrainConfig(), world=4).batch_size == 1  # another count that divides it
    with pytest.raises(UserError, match="global batch of 4 .trained on 2 processes., which does not split over 3"):
        file_config([cf], TrainConfig(), world=3)
    # A file without the mark (ours, or a one-process run's) keeps batch_size per process.
    path.write_text(json.dumps(to_dict(trained)), encoding="utf-8")
    assert file_config([read_config_file(path)], TrainConfig(), world=2).batch_size == 4
    assert distributed.run_config_values(to_dict(trained), distributed.Processes()) == to_dict(trained)


def _resume(rank: int, port: int, root: str, out: dict) -> None:
    from pathlib import Path

    from lib_lora.config import TrainConfig

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # Each process's own disk: the main process finds a state, the other one's folder is empty.
        rs = RunState(procs=distributed.Processes(rank=rank, world=2), run_dir=Path(root) / f"machine{rank}")
        cfg = TrainConfig(name="x", dataset="d", device="cpu")
        got = [_outcome(lambda: distributed.load_for_resume(rs, cfg, None, lambda *_: None)),  # --restart: both start
               _outcome(lambda: distributed.load_for_resume(rs, cfg, None, lambda *_: {"step": 3}))]
        got.append(repr(distributed.broadcast(rs.procs, "still in step")))
        out[rank] = got
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(300)
def test_a_process_that_does_not_find_the_resumed_state_stops_every_process(tmp_path):
    out = _on_two_processes(_resume, str(tmp_path))
    main, other = out[0], out[1]
    assert main[0] == other[0] == "ok None"
    want = (f"UserError: The main process resumes at step 3, but process 1 finds no saved state in "
            f"{tmp_path / 'machine1' / 'state' / 'state.pt'}: every machine needs the same run folder")
    assert main[1].startswith(want) and other[1].startswith(want), (main[1], other[1])
    assert main[2] == other[2] == "'still in step'"
