"""Rank and module dropout (kohya's `rank_dropout` / `module_dropout` network args).

kohya's sd-scripts networks/lora.py LoRAModule.forward (commit 48d368fa557731ad0488c07304dfeba8c07910eb):
module dropout returns the original output for the step with probability p; rank dropout zeroes
each rank of each sample with probability p (one mask over all tokens or pixels) and scales the
update by 1 / (1 - p). Both act only in training mode. The expected values below are that rule
written out, drawn from the same RNG state."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from progress_helpers import StopAt
from torch import nn

from lib_lora.config import TrainConfig, validate
from lib_lora.errors import Cancelled, UserError
from lib_lora.training import state
from lib_lora.training.export import read_lora
from lib_lora.training.lora import LoRAModule
from lib_lora.training.run import train


def _module(org: nn.Module, **kw) -> LoRAModule:
    torch.manual_seed(0)
    m = LoRAModule("lora_unet_x", org, dim=8, alpha=4.0, **kw)
    with torch.no_grad():
        m.lora_up.weight.normal_(0, 0.1)
    m.apply_to()
    return m


@pytest.mark.parametrize("shape", [(4, 16), (4, 7, 16), (4, 16, 5, 5)], ids=["linear", "tokens", "conv"])
def test_rank_dropout_masks_ranks_per_sample_and_rescales(shape):
    p = 0.5
    org = nn.Conv2d(16, 12, 3, padding=1) if len(shape) == 4 else nn.Linear(16, 12)
    m = _module(org, rank_dropout=p)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = m._org_forward(x)
        h = m.lora_down(x)
        m.train()
        torch.manual_seed(5)
        got = org(x)
        torch.manual_seed(5)
        mask = torch.rand((shape[0], 8)) > p
        mask = mask.view(shape[0], *([1] * (len(shape) - 2)), 8) if len(shape) == 3 else \
            mask.view(shape[0], 8, *([1] * (len(shape) - 2)))
        want = base + m.lora_up(h * mask * (m.scale / (1 - p)))
        assert 0 < mask.sum() < mask.numel()  # some ranks of some samples dropped, not all
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        full = base + m.lora_up(h * m.scale)
        assert not torch.allclose(got, full)  # it does something while training...
        m.eval()
        torch.testing.assert_close(org(x), full, rtol=0, atol=0)  # ...and nothing at inference
    m.remove()


def test_module_dropout_skips_the_whole_module_for_a_step():
    org = nn.Linear(16, 12)
    m = _module(org, module_dropout=0.5)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = m._org_forward(x)
        full = base + m.lora_up(m.lora_down(x) * m.scale)
        m.train()
        torch.manual_seed(11)
        draws = [bool(torch.rand(1) < 0.5) for _ in range(20)]
        torch.manual_seed(11)
        outs = [org(x) for _ in range(20)]
        for skipped, out in zip(draws, outs, strict=True):
            assert torch.equal(out, base) if skipped else torch.equal(out, full)
        assert 0 < sum(draws) < 20
        m.eval()
        assert all(torch.equal(org(x), full) for _ in range(20))  # never at inference
    m.remove()


def _cfg(tmp_path, dataset, **kw) -> TrainConfig:
    base = dict(name="drop", dataset=str(dataset), output_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"),
                resolution=64, dim=4, alpha=2.0, lr="1e-3", optimizer="adamw", lr_scheduler="constant", device="cpu",
                max_steps=4, save_precision="fp32", seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_dropouts_change_training_and_are_recorded_as_kohya_does(tmp_path, drawn_dataset, tiny_backbone, one_thread):
    plain = train(_cfg(tmp_path / "a", drawn_dataset), backbone=tiny_backbone)
    dropped = train(_cfg(tmp_path / "b", drawn_dataset, rank_dropout=0.3, module_dropout=0.3), backbone=tiny_backbone)
    again = train(_cfg(tmp_path / "c", drawn_dataset, rank_dropout=0.3, module_dropout=0.3), backbone=tiny_backbone)
    a, b, c = (read_lora(r.lora_path) for r in (plain, dropped, again))
    assert any(not torch.equal(a[0][k], b[0][k]) for k in a[0])  # the run learnt something else
    assert all(torch.equal(b[0][k], c[0][k]) for k in b[0])  # the same seed, the same draws
    assert "ss_network_args" not in a[1]  # kohya writes the key only for arguments given
    assert json.loads(b[1]["ss_network_args"]) == {"rank_dropout": "0.3", "module_dropout": "0.3"}
    one = train(_cfg(tmp_path / "d", drawn_dataset, module_dropout=0.2, conv_dim=2), backbone=tiny_backbone)
    assert json.loads(read_lora(one.lora_path)[1]["ss_network_args"]) == {
        "conv_dim": "2", "conv_alpha": "1.0", "module_dropout": "0.2"}



def test_resume_with_dropouts_is_byte_identical(tmp_path, drawn_dataset, tiny_backbone, one_thread):
    kw = dict(max_steps=6, rank_dropout=0.25, module_dropout=0.25, network_dropout=0.1)
    ref = train(_cfg(tmp_path / "a", drawn_dataset, **kw), backbone=tiny_backbone)
    cfg = _cfg(tmp_path / "b", drawn_dataset, state_every_n_steps=2, **kw)
    with pytest.raises(Cancelled):
        train(cfg, progress=StopAt(3), backbone=tiny_backbone)
    assert state.load_state(state.state_path(cfg.run_dir))["step"] == 3
    res = train(cfg, backbone=tiny_backbone)
    a, b = read_lora(ref.lora_path)[0], read_lora(res.lora_path)[0]
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_lycoris_types_get_lycoris_own_dropouts(tiny_backbone):
    pytest.importorskip("lycoris")
    from lib_lora.training.lycoris_net import LycorisKohyaNetwork, make_network

    targets = [t for t in tiny_backbone.lora_targets() if isinstance(t.module, nn.Linear)][:3]
    cfg = TrainConfig(name="x", dataset="", dim=4, alpha=2.0, network_type="loha", rank_dropout=0.2, module_dropout=1.0)
    net = make_network(targets, cfg)
    assert isinstance(net, LycorisKohyaNetwork)
    assert all((m.rank_dropout, m.module_dropout) == (0.2, 1.0) for m in net.loras)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        x = torch.randn(2, targets[0].module.in_features, generator=gen)
        base = targets[0].module(x)
        net.apply()
        try:
            net.train()
            assert torch.equal(targets[0].module(x), base)  # module dropout 1: every step skipped
            net.eval()
            assert not torch.allclose(targets[0].module(x), base)  # and never at inference
        finally:
            net.remove()


def test_schema_cli_and_bad_values(drawn_dataset):
    from lib_lora.training.cli import config_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train", str(drawn_dataset), "--rank-dropout", "0.1", "--module-dropout", "0.05"])
    cfg = config_from_args(args)
    assert (cfg.rank_dropout, cfg.module_dropout) == (0.1, 0.05)
    assert (TrainConfig(name="x", dataset="").rank_dropout, TrainConfig(name="x", dataset="").module_dropout) == (0, 0)
    with pytest.raises(UserError, match="rank_dropout"):
        validate(TrainConfig(name="x", dataset="", rank_dropout=1.0))
    with pytest.raises(UserError):
        validate(TrainConfig(name="x", dataset="", module_dropout=1.5))
