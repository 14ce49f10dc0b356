"""Never a broken LoRA or state: NaN and infinity are refused wherever a number enters (the
schema behind the CLI, the UI, the REST route and config files), a diverged run ends with an
error and writes nothing, and the advice for an export that overflows fp16 can be followed."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from helpers_rel import make_dataset, tiny_config
from test_rel_resume import StopAt

from lib_lora import config
from lib_lora.config import PrepareConfig, TagConfig, TrainConfig
from lib_lora.errors import Cancelled, UserError
from lib_lora.training import guards, state
from lib_lora.training.export import read_lora
from lib_lora.training.run import Trainer, train

NONFINITE = [float("nan"), float("inf"), float("-inf")]


def _number_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if config.field_type(cls, f)[0] in (int, float)]


@pytest.mark.parametrize("cls", [TrainConfig, TagConfig, PrepareConfig])
def test_every_number_field_refuses_nan_and_infinity(cls, tmp_path):
    names = _number_fields(cls)
    assert len(names) >= 3
    for name in names:
        for value in NONFINITE:
            with pytest.raises(UserError, match=rf"^{name} = {value} is not a finite number"):
                config.validate(dataclasses.replace(cls(), **{name: value}))
    # A config file (the run's config.json, a saved preset): json reads NaN and Infinity.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({names[0]: float("nan")}), encoding="utf-8")
    with pytest.raises(UserError, match="not a finite number"):
        config.load(cls, path)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "Infinity", "1e999"])
def test_the_learning_rate_refuses_nan_and_infinity(text):
    with pytest.raises(UserError, match=rf"^lr = {text} is not a finite number"):
        config.validate(TrainConfig(lr=text))


@pytest.mark.parametrize(
    "flags, field",
    [(["--max-grad-norm", "nan"], "max_grad_norm"), (["--lr", "inf"], "lr"), (["--lr", "nan"], "lr"),
     (["--lr-warmup-steps", "nan"], "lr_warmup_steps"), (["--text-encoder-lr", "inf"], "text_encoder_lr"),
     (["--noise-offset=-inf"], "noise_offset")],
)  # fmt: skip
def test_the_cli_refuses_them_in_one_sentence(flags, field, tmp_path, capsys):
    from lib_lora.cli import main

    ds = make_dataset(tmp_path / "data")
    rc = main(["train", str(ds), "--output-dir", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {field} = ") and "not a finite number" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_the_ui_and_rest_conversions_refuse_them():
    from lib_lora.hosts.webui_app import config_from_request, form_values_to_config
    from lib_lora.ui import forms
    from lib_lora.ui.paths import FolderPolicy

    names = ["lr", "max_grad_norm", "max_steps", "text_encoder_lr", "epochs"]
    good = ["1e-4", 1.0, "", "", 1]
    assert forms.collect(TrainConfig, names, good, policy=FolderPolicy()).max_grad_norm == 1.0
    for i, bad in [(0, "nan"), (1, float("nan")), (1, "inf"), (2, "inf"), (3, "-inf"), (4, float("nan"))]:
        values = list(good)
        values[i] = bad
        with pytest.raises(UserError, match="not a finite number"):  # int(nan) raised ValueError here
            forms.collect(TrainConfig, names, values, policy=FolderPolicy())
    # The fallback tab's Number fields.
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name in ("max_grad_norm", "epochs")]
    for values in ([float("nan"), 1], [1.0, float("inf")]):
        with pytest.raises(UserError, match="not a finite number"):
            form_values_to_config(fields, values)
    # The Test tab's LoRA weights.
    from lib_lora.ui.tab_test import parse_weights

    assert parse_weights("0, 0.5, 1") == [0.0, 0.5, 1.0]
    for text in ("0, nan", "inf", "1, -inf"):
        with pytest.raises(UserError, match="NaN and infinity are not weights"):
            parse_weights(text)
    # The REST route: FastAPI parses the body with json, which reads NaN and Infinity.
    for body in ['{"max_grad_norm": NaN}', '{"lr": "nan"}', '{"max_steps": Infinity}', '{"lr_warmup_steps": NaN}']:
        request = {"preset": "style", "name": "x", "dataset": "d", **json.loads(body)}
        with pytest.raises(UserError, match="not a finite number"):
            config_from_request(request)


def _lora_folder_files(tmp_path):
    out = tmp_path / "out"
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def test_a_diverged_run_fails_and_writes_no_lora(tmp_path, capsys):
    """lr 1e12: the first step puts weights of 1e12 in (finite, so saved in fp32 they made a
    LoRA), then every loss is NaN and is skipped, too few in a row to stop the run."""
    from lib_lora.cli import main

    ds = make_dataset(tmp_path / "data")
    rc = main(["train", str(ds), "--base-model", "tiny", "--output-dir", str(tmp_path / "out"),
               "--run-dir", str(tmp_path / "run"), "--resolution", "64", "--min-bucket-reso", "64", "--dim", "4",
               "--optimizer", "adamw", "--lr", "1e12", "--max-steps", "4", "--save-precision", "fp32",
               "--device", "cpu", "--log-every-n-steps", "1"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 2 and "final loss" not in out
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: Training ended at step 4 with a non-finite loss (nan), so no LoRA was saved")
    assert "Traceback" not in err
    assert _lora_folder_files(tmp_path) == []
    assert not state.state_path(tmp_path / "run").exists()  # the diverged last step's state is not kept
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


class CorruptAfter(Trainer):
    """A numeric fault the step guard does not see: after `step` steps one LoRA weight is NaN."""

    at = 2

    def optimizer_step(self):
        super().optimizer_step()
        if self.state.step == self.at:  # (state.step counts the steps done before this one)
            with torch.no_grad():
                self.state.params[0].view(-1)[0] = float("nan")


def test_a_state_with_nonfinite_weights_is_never_written(tmp_path, bb):
    ds = make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, ds, max_steps=5, state_every_n_steps=1, network_dropout=0.0)
    with pytest.raises(guards.NonFiniteError, match=r"became NaN/inf by step 3 .*last good state .* was kept"):
        CorruptAfter(cfg, bb).run()
    st = state.load_state(state.state_path(cfg.run_dir))
    assert st["step"] == 2 and not state.nonfinite_tensors({"n": st["network"], "o": st["optimizer"]})
    assert _lora_folder_files(tmp_path) == []


class HugeAtTheEnd(Trainer):
    """The last step leaves one weight at 1e5: finite, and beyond fp16's largest value (65504)."""

    def optimizer_step(self):
        super().optimizer_step()
        if self.state.step + 1 == self.state.total_steps:
            with torch.no_grad():
                self.state.params[0].view(-1)[0] = 1e5


def test_the_fp16_overflow_advice_resumes_with_another_save_precision(tmp_path, bb):
    ds = make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, ds, max_steps=4, save_precision="fp16")
    with pytest.raises(UserError, match=r"overflow torch.float16 in 1 tensors .*not saved.*save in fp32 or bf16"):
        HugeAtTheEnd(cfg, bb).run()
    assert _lora_folder_files(tmp_path) == []
    assert state.load_state(state.state_path(cfg.run_dir))["step"] == 4
    seen = []
    res = train(dataclasses.replace(cfg, save_precision="fp32"), backbone=bb, on_event=seen.append)
    assert any("Resuming at step 4 of 4" in e.get("text", "") for e in seen)
    tensors, meta = read_lora(res.lora_path)
    assert all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in tensors.values())
    assert max(float(t.abs().max()) for t in tensors.values()) == 1e5  # the run's own weights, kept exactly


def test_a_stopped_run_resumes_with_another_save_precision(tmp_path, bb):
    ds = make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, ds, max_steps=6)
    with pytest.raises(Cancelled):
        train(cfg, progress=StopAt(3), backbone=bb)
    seen = []
    res = train(dataclasses.replace(cfg, save_precision="bf16", comment="resumed"), on_event=seen.append, backbone=bb)
    assert any("Resuming at step 3 of 6" in e.get("text", "") for e in seen) and res.steps == 6
    tensors, _ = read_lora(res.lora_path)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert all(math.isfinite(float(t.float().abs().max())) for t in tensors.values())

