"""Resume: a run stopped at an arbitrary step and resumed ends with the same LoRA bytes."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers_rel import header, make_dataset, tensor_bytes, tiny_config
from progress_helpers import StopAt

from lib_lora.errors import Cancelled, UserError
from lib_lora.progress import NullProgress
from lib_lora.training import state
from lib_lora.training.run import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _events():
    seen = []
    return seen, seen.append


@pytest.mark.parametrize("stop_at", [5])
def test_resume_is_byte_identical(tmp_path, stop_at, bb):
    ds = make_dataset(tmp_path / "data")
    ref = train(tiny_config(tmp_path / "a", ds), backbone=bb)

    cfg = tiny_config(tmp_path / "b", ds, state_every_n_steps=3)
    with pytest.raises(Cancelled):
        train(cfg, progress=StopAt(stop_at), backbone=bb)
    st = state.load_state(state.state_path(cfg.run_dir))
    assert st["step"] == stop_at
    assert not (tmp_path / "b" / "out" / "rel.safetensors").exists()

    seen, on_event = _events()
    res = train(cfg, on_event=on_event, backbone=bb)
    phases = [e["text"] for e in seen if e["kind"] == "phase"]
    assert any(f"Resuming at step {stop_at} of 12" in t for t in phases), phases
    assert res.steps == 12
    assert tensor_bytes(res.lora_path) == tensor_bytes(ref.lora_path)
    a, b = header(ref.lora_path)["__metadata__"], header(res.lora_path)["__metadata__"]
    varying = {"ss_training_started_at", "ss_training_finished_at", "ss_session_id", "modelspec.date",
               "sshs_model_hash", "sshs_legacy_hash", "ss_output_name"}  # fmt: skip
    varying.add("fastlora_config")  # holds run_dir / state_every_n_steps, which differ here on purpose
    assert {k: v for k, v in a.items() if k not in varying} == {k: v for k, v in b.items() if k not in varying}
    ca, cb = json.loads(a["fastlora_config"]), json.loads(b["fastlora_config"])
    assert {k for k in ca if ca[k] != cb[k]} <= state.NEUTRAL_FIELDS
    assert not state.state_path(cfg.run_dir).exists()  # finished: the state is gone


def test_restart_and_refusals(tmp_path, bb):
    ds = make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, ds, max_steps=6)
    with pytest.raises(Cancelled):
        train(cfg, progress=StopAt(3), backbone=bb)
    # Different settings: refused with advice, the state untouched.
    with pytest.raises(UserError, match="different settings.*--restart"):
        train(dataclasses.replace(cfg, dim=8), backbone=bb)
    # Changed data: refused.
    (ds / "5_tok" / "img0.txt").write_text("tok, changed", encoding="utf-8")
    with pytest.raises(UserError, match="dataset changed"):
        train(cfg, backbone=bb)
    seen, on_event = _events()
    res = train(dataclasses.replace(cfg, restart=True), on_event=on_event, backbone=bb)
    assert any("--restart" in e.get("text", "") for e in seen)
    assert res.steps == 6


def test_speed_only_settings_may_change_on_resume(tmp_path, bb):
    ds = make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, ds, max_steps=6)
    with pytest.raises(Cancelled):
        train(cfg, progress=StopAt(3), backbone=bb)
    seen, on_event = _events()
    faster = dataclasses.replace(cfg, channels_last=True, cache_text_encoder_outputs=False)
    res = train(faster, on_event=on_event, backbone=bb)
    assert any("Resuming at step 3" in e.get("text", "") for e in seen) and res.steps == 6
    # The model is handed back as it came: a host's U-Net must not stay channels_last.
    assert all(p.is_contiguous() for p in bb.unet.parameters())


def test_unreadable_state_is_refused(tmp_path, bb):
    ds = make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, ds, max_steps=4)
    path = state.state_path(cfg.run_dir)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match="cannot be read.*--restart"):
        train(cfg, backbone=bb)


def test_a_state_with_the_modules_in_another_order_is_refused(tmp_path, bb):
    """The optimizer's moments are matched to parameters by position: a state whose network came
    in another module order (an earlier version's) must not be resumed into this one."""
    import torch

    ds = make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, ds, max_steps=4)
    with pytest.raises(Cancelled):
        train(cfg, progress=StopAt(2), backbone=bb)
    path = state.state_path(cfg.run_dir)
    st = torch.load(path, weights_only=True)
    st["network"] = dict(reversed(list(st["network"].items())))  # the same tensors, another order
    torch.save(st, path)
    with pytest.raises(UserError, match="modules in another order or set.*--restart"):
        train(cfg, backbone=bb)
    assert path.is_file()  # refused, never removed


def test_resumed_auto_lr_run_reuses_the_probe_value(tmp_path, bb):
    """A stopped `--lr auto` run resumes with its probe's value: no second probe, same LoRA."""
    ds = make_dataset(tmp_path / "data")
    probe = dict(lr="auto", probe_min_steps=10, probe_max_steps=10, probe_window=3, lr_warmup_steps=0)
    ref = train(tiny_config(tmp_path / "a", ds, **probe), backbone=bb)

    cfg = tiny_config(tmp_path / "b", ds, state_every_n_steps=2, **probe)
    stop = NullProgress()

    def stop_in_training(event):  # after the probe, at training step 6
        if event["kind"] == "loss" and event["step"] >= 6:
            stop.cancel()

    with pytest.raises(Cancelled):
        train(cfg, progress=stop, on_event=stop_in_training, backbone=bb)
    seen, on_event = _events()
    res = train(cfg, on_event=on_event, backbone=bb)
    assert not [e for e in seen if e["kind"] in ("probe", "probe_done")]
    assert any("Learning rate from the stopped run" in e.get("text", "") for e in seen)
    assert tensor_bytes(res.lora_path) == tensor_bytes(ref.lora_path)
    a, b = header(ref.lora_path)["__metadata__"], header(res.lora_path)["__metadata__"]
    assert a["ss_unet_lr"] == b["ss_unet_lr"]
    pa, pb = json.loads(a["fastlora_lr_probe"]), json.loads(b["fastlora_lr_probe"])
    assert {k: v for k, v in pa.items() if k != "seconds"} == {k: v for k, v in pb.items() if k != "seconds"}
