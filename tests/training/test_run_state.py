"""A run's state is one declared value; the guard, the probe and the resumable state are
functions over it that never import the loop, never swap its config and never patch its
optimizer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_lora.config import TrainConfig
from lib_lora.training import guards
from lib_lora.training.run import Trainer
from lib_lora.training.run_state import RUN_ONLY, GuardCounters, RunState

PACKAGE = Path(__file__).resolve().parents[2] / "lib_lora" / "training"
OVER_THE_STATE = ("guards", "probe", "state", "run_state")


@pytest.mark.parametrize("module", OVER_THE_STATE)
def test_each_module_over_the_state_imports_alone_without_the_loop(module):
    code = (f"import sys; import lib_lora.training.{module}; "
            "sys.exit(3 if 'lib_lora.training.run' in sys.modules else 0)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("module", OVER_THE_STATE)
def test_no_module_over_the_state_names_the_loop_even_for_types(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert "lib_lora.training.run" not in names
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "lib_lora.training"
                and any(a.name == "run" for a in n.names)]  # fmt: skip


def test_nothing_outside_the_loop_replaces_the_config_or_an_optimizer_step():
    """The probe gets its settings as an argument, the out-of-memory retry records checkpointing
    in the state; the guard wraps the step in a function the loop calls."""
    for module in OVER_THE_STATE:
        tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for sub in ast.walk(t):
                        assert not (isinstance(sub, ast.Attribute) and sub.attr in ("cfg", "step")
                                    and isinstance(sub.value, ast.Name) and sub.value.id != "rs"), (module, sub.attr)  # fmt: skip


def test_a_field_that_is_not_declared_cannot_be_set():
    with pytest.raises(AttributeError):
        RunState().networks = None  # a typo, or a field some module would add on the side
    with pytest.raises(AttributeError):
        GuardCounters().skipped = 1
    tr = Trainer(TrainConfig(name="x"))
    with pytest.raises(AttributeError):
        tr.network = None  # the run's state lives in tr.state
    assert set(RUN_ONLY) <= {f for f in RunState.__dataclass_fields__}


def test_the_guarded_step_leaves_the_optimizer_as_it_was():
    """The non-finite guard steps a fused optimizer with found_inf and skips the update, without
    replacing its `step` or leaving attributes on it."""
    lin = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, fused=True)
    g = guards.new_counters(opt, torch.device("cpu"))
    assert g.on_device
    before = dict(vars(opt))
    w = lin.weight.detach().clone()
    lin(torch.ones(1, 3)).sum().mul(float("nan")).backward()
    guards.step_optimizer(g, opt, None, None, list(lin.parameters()))
    assert torch.equal(lin.weight, w) and float(g.flags[-1]) == 1.0  # skipped, and noted
    opt.zero_grad()
    lin(torch.ones(1, 3)).sum().backward()
    guards.step_optimizer(g, opt, None, None, list(lin.parameters()))
    assert not torch.equal(lin.weight, w) and float(g.flags[-1]) == 0.0
    assert "step" not in vars(opt) and set(vars(opt)) == set(before)
