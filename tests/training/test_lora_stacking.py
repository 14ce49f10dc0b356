"""Several LoRAs on one model (two in one prompt): each applies on top of the others, and
removing them in any order leaves the ones still applied acting and, at the end, the model
exactly as it was."""

from __future__ import annotations

import itertools

import pytest
import torch

from lib_lora.training.lora import LoRANetwork


def _eps(bb, ids, lat, t) -> torch.Tensor:
    with torch.no_grad():
        return bb.predict_noise(lat, t, bb.encode_text(ids).expand(lat.shape[0], -1, -1))


@pytest.mark.parametrize("removal", list(itertools.permutations(range(3))))
def test_stacked_loras_come_off_in_any_order(tiny_backbone, randomize, removal):
    bb = tiny_backbone
    nets = []
    for seed in range(3):
        net = LoRANetwork(bb.lora_targets(conv=True), dim=4, alpha=2, conv_dim=2, conv_alpha=1)
        randomize(net, seed=seed)
        nets.append(net)
    ids = bb.tokenizer(["sks, 1girl"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    lat, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 900])
    modules = [m.org_module for m in nets[0].loras.values()]
    base = _eps(bb, ids, lat, t)

    def with_only(kept: tuple[int, ...]) -> torch.Tensor:
        """The output with exactly these networks applied, in this order, on a clean model."""
        for i in kept:
            nets[i].apply()
        try:
            return _eps(bb, ids, lat, t)
        finally:
            for i in reversed(kept):
                nets[i].remove()

    expected = {kept: with_only(kept) for n in range(1, 4) for kept in itertools.combinations(range(3), n)}
    assert torch.equal(_eps(bb, ids, lat, t), base)
    try:
        for net in nets:
            net.apply()
        everything = _eps(bb, ids, lat, t)
        assert torch.equal(everything, expected[(0, 1, 2)])
        for kept in expected:  # every network acts: leaving any out changes the output
            assert kept == (0, 1, 2) or not torch.allclose(everything, expected[kept])
        left = [0, 1, 2]
        for i in removal:
            nets[i].remove()
            left.remove(i)
            if left:  # the ones still applied act as if the removed one had never been there
                torch.testing.assert_close(_eps(bb, ids, lat, t), expected[tuple(left)])
    finally:
        for net in nets:
            net.remove()
    assert all("forward" not in vars(m) for m in modules)  # no wrapper left behind
    assert torch.equal(_eps(bb, ids, lat, t), base)
