"""The pieces of data-parallel training that need no model: how a batch is shared out, and the
non-finite guard's agreement between processes (2 real gloo processes, spawned)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_agree, args=(port, out), nprocs=2, join=True)  # two real processes, one gloo group
        got = dict(out)
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
