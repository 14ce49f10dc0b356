"""The non-finite guard without a host sync in the step (issue 8 on issue 5's guard).

A step must not read anything back from the device: the spy below records every tensor
method that does (`item`, `bool`, `float`, `tolist`, ...), which on a GPU is a sync.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lib_lora.config import TrainConfig
from lib_lora.training import data as data_mod
from lib_lora.training import guards
from lib_lora.training.run import Trainer, train
from lib_lora.training.run_state import RunState

# Tensor methods that copy a value to the host (a device sync on CUDA).
HOST_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
              torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}  # fmt: skip
GUARD = dict(name="guardtest", device="cpu", log_every_n_steps=5, max_steps=6)


class HostReadSpy(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _ready(ready_trainer, cfg: TrainConfig, backbone) -> Trainer:
    tr = ready_trainer(cfg, backbone)
    tr.begin_reliability()  # the loop's step guard, as Trainer.setup() makes it
    return tr


def _batches(tr: Trainer, n: int) -> list[data_mod.Batch]:
    it = data_mod.iter_batches(tr.state.dataset.items, tr.cfg, n, tr.cfg.seed)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_a_guarded_step_reads_nothing_back_from_the_device(tmp_path, bb, max_grad_norm, speed_cfg, ready_trainer):
    tr = _ready(ready_trainer, speed_cfg(tmp_path, **GUARD, max_grad_norm=max_grad_norm), bb)
    assert tr.state.guard.on_device  # torch's fused AdamW takes the device-side skip flag
    batches = _batches(tr, 3)
    # A first pass fills the feeder's caches; on a cache miss it reads *host* token tensors,
    # which the spy cannot tell from device tensors on a CPU-only machine.
    for b in batches:
        tr.guarded_step(b)
    with HostReadSpy() as spy:
        for b in batches:
            tr.guarded_step(b)
    assert spy.calls == []

    # The spy does see the host check the other optimizers need (it can fail).
    tr.state.guard.on_device = False
    with HostReadSpy() as spy:
        tr.guarded_step(batches[0])
    assert "__bool__" in spy.calls


def test_a_nonfinite_step_leaves_weights_and_moments_alone_and_is_counted(tmp_path, bb, speed_cfg, ready_trainer):
    tr = _ready(ready_trainer, speed_cfg(tmp_path, **GUARD), bb)
    b1, b2, b3 = _batches(tr, 3)
    tr.guarded_step(b1)
    tr.state.step = 1
    before = {k: v.clone() for k, v in tr.state.network.state_dict().items()}
    p0 = tr.state.params[0]
    moments = tr.state.optimizer.state[p0]["exp_avg"].clone()
    steps_before = float(tr.state.optimizer.state[p0]["step"])

    hook = p0.register_hook(lambda g: g * float("nan"))  # one parameter's gradient turns NaN
    tr.guarded_step(b2)
    hook.remove()
    tr.state.step = 2
    for k, v in tr.state.network.state_dict().items():
        assert torch.equal(v, before[k]), k  # no parameter moved, not even the finite ones
    assert torch.equal(tr.state.optimizer.state[p0]["exp_avg"], moments)
    assert float(tr.state.optimizer.state[p0]["step"]) == steps_before
    guards.settle(tr.state, tr.cfg)
    assert (tr.state.guard.in_a_row, tr.state.guard.skipped_total, tr.state.guard.first_bad_step) == (1, 1, 2)

    tr.guarded_step(b3)
    tr.state.step = 3
    guards.settle(tr.state, tr.cfg)
    assert (tr.state.guard.in_a_row, tr.state.guard.skipped_total) == (0, 1)
    assert any(not torch.equal(v, before[k]) for k, v in tr.state.network.state_dict().items())


@pytest.mark.parametrize("optimizer,log_every", [("adamw", 4), ("prodigy", 1)])
def test_too_many_skipped_steps_stop_at_the_next_loss_read(tmp_path, bb, optimizer, log_every, speed_cfg):
    # An absurd learning rate drives the activations to inf/NaN within a few steps.
    run = {**GUARD, "optimizer": optimizer, "lr": "1e12", "max_grad_norm": 0.0, "max_steps": 40,
           "max_nonfinite_steps": 3, "log_every_n_steps": log_every, "lr_scheduler": "constant", "network_dropout": 0.0}
    cfg = speed_cfg(tmp_path, **run)
    with pytest.raises(guards.NonFiniteError, match=r"stopped at step (\d+): (\d+) steps in a row") as info:
        train(cfg, backbone=bb)
    import re

    at, run = map(int, re.search(r"step (\d+): (\d+) steps", str(info.value)).groups())
    assert at % log_every == 0 and run >= 3  # the device counters are read with the loss
    assert not (tmp_path / "out" / "guardtest.safetensors").exists()


def test_fp16_grad_scaler_skips_are_counted_with_a_fused_optimizer():
    """GradScaler calls a fused optimizer's step every time (passing found_inf); the guard must
    still count the steps it skipped. (CPU GradScaler: the same code path as CUDA's.)"""
    lin = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    poison = {"on": False}
    rs = RunState(optimizer=opt, scaler=scaler, params=list(lin.parameters()), precision="fp16", run_dir=Path("run"),
                  guard=guards.new_counters(opt, torch.device("cpu")))  # fmt: skip
    cfg = TrainConfig(max_nonfinite_steps=2)

    def train_step(batch):  # the loop's optimizer_step, reduced to what the scaler path needs
        loss = lin(torch.ones(2, 4)).pow(2).mean() * (float("inf") if poison["on"] else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        guards.step_optimizer(rs.guard, opt, scaler, None, rs.params)
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def step(batch):
        return guards.run_step(rs, cfg, batch, train_step, train_step, lambda text: None)

    assert rs.guard.on_device
    batch = SimpleNamespace(items=[1])
    step(batch)
    weight = lin.weight.detach().clone()
    poison["on"] = True
    step(batch)
    assert torch.equal(lin.weight, weight)
    rs.step = 2
    guards.settle(rs, cfg)
    assert (rs.guard.in_a_row, rs.guard.skipped_total) == (1, 1)
    step(batch)
    rs.step = 3
    with pytest.raises(guards.NonFiniteError, match="2 steps in a row.*bf16"):
        guards.settle(rs, cfg)
