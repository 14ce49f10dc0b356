"""A finished or stopped run lets go of its memory even while its Trainer is still referenced
(a host runs job after job in one process: the WebUI grew by gigabytes over a few trainings)."""

from __future__ import annotations

import gc
import weakref

import pytest

from lib_lora.config import TrainConfig
from lib_lora.errors import Cancelled
from lib_lora.training.run import Trainer


def _cfg(tmp_path, dataset, **kw) -> TrainConfig:
    base = dict(name="release", dataset=str(dataset), output_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"),
                resolution=64, dim=4, alpha=2.0, lr="1e-3", optimizer="adamw", lr_scheduler="constant",
                device="cpu", log_every_n_steps=1, max_steps=4, state_every_n_steps=0)
    base.update(kw)
    return TrainConfig(**base)


class StopAt:
    """A Progress whose Stop is pressed once training step `step` is logged."""

    def __init__(self, step: int | None):
        self.step, self.pressed = step, False

    def update(self, done: int, total: int, text: str = "") -> None:
        pass

    def cancelled(self) -> bool:
        return self.pressed


@pytest.mark.parametrize("stop_at", [None, 2], ids=["finished", "stopped"])
def test_the_runs_big_objects_are_freed_while_the_trainer_is_kept(tmp_path, drawn_dataset, tiny_backbone, stop_at):
    refs: dict[str, weakref.ref] = {}

    def grab(ev):  # mid-run: the latent cache, the optimizer and its state, the LoRA network, the feeder
        if ev["kind"] == "loss" and stop_at is not None and ev["step"] >= stop_at:
            progress.pressed = True
        if ev["kind"] == "loss" and not refs:
            state = next(iter(tr.state.optimizer.state.values()))
            refs.update(optimizer=weakref.ref(tr.state.optimizer), network=weakref.ref(tr.state.network),
                        latent=weakref.ref(next(iter(tr.state.latent_of.values()))), exp_avg=weakref.ref(state["exp_avg"]),
                        feeder=weakref.ref(tr.state.feeder), lora_weight=weakref.ref(next(tr.state.network.parameters())))

    progress = StopAt(stop_at)
    tr = Trainer(_cfg(tmp_path, drawn_dataset), backbone=tiny_backbone, progress=progress, on_event=grab)
    if stop_at is None:
        result = tr.run()
        assert result.lora_path.is_file() and result.steps == 4
    else:
        with pytest.raises(Cancelled):
            tr.run()
        assert list((tmp_path / "run" / "checkpoints").glob("*interrupted*"))  # saved before letting go
    gc.collect()
    assert set(refs) == {"optimizer", "network", "latent", "exp_avg", "feeder", "lora_weight"}
    alive = sorted(name for name, ref in refs.items() if ref() is not None)
    assert not alive, f"still held after the run: {alive}"
    assert tr.state.step == (4 if stop_at is None else 2)  # what a caller reads afterwards stays
