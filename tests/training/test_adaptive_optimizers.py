"""D-Adaptation and Prodigy refuse different lrs per group; the optimizer factory copes."""

import pytest
import torch

from lib_lora.config import TrainConfig
from lib_lora.training.optim import group_lrs, make_optimizer, param_groups


@pytest.mark.parametrize("name", ["dadaptation", "prodigy"])
def test_adaptive_optimizers_take_a_unet_and_text_encoder_group(name):
    cfg = TrainConfig(name="x", optimizer=name, lr="1.0")
    unet_p, te_p = [torch.nn.Parameter(torch.randn(8, 8))], [torch.nn.Parameter(torch.randn(8, 8))]
    choice = make_optimizer(cfg, param_groups(unet_p, te_p, 1.0, 0.1), torch.device("cpu"))
    groups = choice.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1.0, 1.0]
    if name == "dadaptation":
        assert [g["layer_scale"] for g in groups] == [1.0, pytest.approx(0.1)]
        # What the run logs (lr/textencoder, d*lr) is the step each group really takes.
        lrs = group_lrs(choice.optimizer)
        assert lrs["unet"] == 1.0 and lrs["textencoder"] == pytest.approx(0.1)
        assert lrs["textencoder_d*lr"] == pytest.approx(0.1 * lrs["unet_d*lr"])
    else:
        assert "text-encoder lr ratio does not apply" in choice.note
    for p in unet_p + te_p:
        p.grad = torch.ones_like(p)
    choice.optimizer.step()  # steps without "different lr values" errors
