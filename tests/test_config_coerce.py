"""One conversion of user input into the schema's types (`config.coerce`), behind the CLI's flags,
the UI's controls and the REST body; `validate` refuses a config built with a wrong type."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import pytest

from lib_lora import config
from lib_lora.config import PrepareConfig, TagConfig, TrainConfig, coerce
from lib_lora.errors import UserError

GOOD = [
    (TrainConfig, "dim", "128", 128), (TrainConfig, "dim", 12.0, 12), (TrainConfig, "dim", " 1e2 ", 100),
    (TrainConfig, "alpha", "2", 2.0), (TrainConfig, "alpha", 3, 3.0), (TrainConfig, "noise_offset", "-inf", -math.inf),
    (TrainConfig, "overwrite", "yes", True), (TrainConfig, "overwrite", "OFF", False), (TrainConfig, "overwrite", 1, True),
    (TrainConfig, "overwrite", None, False), (TrainConfig, "overwrite", True, True),
    (TrainConfig, "max_steps", "", None), (TrainConfig, "max_steps", "none", None), (TrainConfig, "max_steps", None, None),
    (TrainConfig, "max_steps", "40", 40), (TrainConfig, "text_encoder_lr", " ", None),
    (TrainConfig, "text_encoder_lr", "5e-5", 5e-5), (TrainConfig, "lr", "auto", "auto"), (TrainConfig, "lr", 1e-4, "0.0001"),
    (TrainConfig, "lr", "1e-4", "1e-4"), (TrainConfig, "name", None, ""), (TrainConfig, "optimizer", "adamw", "adamw"),
    (TrainConfig, "dataset", Path("/data/x"), str(Path("/data/x"))), (TrainConfig, "comment", "", ""),
    (TagConfig, "blacklist", "long hair, , smile", ["long hair", "smile"]), (TagConfig, "blacklist", ["a ", "b"], ["a", "b"]),
    (TagConfig, "blacklist", None, []), (TagConfig, "general_threshold", "0.4", 0.4), (PrepareConfig, "size", "768", 768),
]  # fmt: skip


@pytest.mark.parametrize("cls, name, value, expected", GOOD)
def test_input_becomes_the_declared_type(cls, name, value, expected):
    got = coerce(cls, name, value)
    assert got == expected and type(got) is type(expected)


BAD = [
    (TrainConfig, "dim", "12.5", "--dim = '12.5' is not a whole number."),
    (TrainConfig, "dim", "many", "--dim = 'many' is not a whole number."),
    (TrainConfig, "dim", True, "--dim = True is not a whole number."),
    (TrainConfig, "dim", "", "--dim is empty: give a whole number such as 128."),
    (TrainConfig, "epochs", float("nan"), "--epochs = nan is not a finite number"),
    (TrainConfig, "max_steps", "inf", "--max-steps = inf is not a finite number"),
    (TrainConfig, "alpha", "x", "--alpha = 'x' is not a number."),
    (TrainConfig, "alpha", [1], "--alpha = [1] is not a number."),
    (TrainConfig, "overwrite", "maybe", "--overwrite = 'maybe' is neither on nor off: give true or false."),
    (TrainConfig, "overwrite", 2, "--overwrite = 2 is neither on nor off"),
    (TrainConfig, "name", {"a": 1}, "--name = {'a': 1} is not text."),
    (TrainConfig, "lr", True, "--lr = True is not text."),
    (TagConfig, "blacklist", 5, "--blacklist = 5 is not a list of text"),
]  # fmt: skip


@pytest.mark.parametrize("cls, name, value, message", BAD)
def test_a_bad_value_gets_one_sentence_naming_the_field(cls, name, value, message):
    with pytest.raises(UserError) as err:
        coerce(cls, name, value)
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text and text.endswith(".")


def test_validate_refuses_a_wrong_type_in_a_built_config():
    with pytest.raises(UserError, match=r"^--dim = '128' is text, not a whole number\.$"):
        config.validate(TrainConfig(dim="128"))
    for cls in (TrainConfig, TagConfig, PrepareConfig):
        for f in dataclasses.fields(cls):
            typ, optional = config.field_type(cls, f)
            wrong = 3 if typ in (str, bool) else "3"  # a number where text goes, text where a number or a list goes
            with pytest.raises(UserError, match=rf"^{config.flag_of(f.name)} = .* is .*, not "):
                config.validate(dataclasses.replace(cls(), **{f.name: wrong}))
            if not optional:
                with pytest.raises(UserError, match=rf"^{config.flag_of(f.name)} is empty"):
                    config.validate(dataclasses.replace(cls(), **{f.name: None}))
    config.validate(TrainConfig(alpha=2, max_steps=None))  # an int where a float goes is a number; None where allowed


def test_a_config_file_is_read_with_the_same_conversion(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"dim": "64", "alpha": 8, "overwrite": "true", "max_steps": ""}', encoding="utf-8")
    cfg = config.load(TrainConfig, path)
    assert (cfg.dim, cfg.alpha, cfg.overwrite, cfg.max_steps) == (64, 8.0, True, None)
    path.write_text('{"dim": "6.5"}', encoding="utf-8")
    with pytest.raises(UserError, match=r"^--dim = '6.5' is not a whole number\.$"):
        config.load(TrainConfig, path)


def test_the_cli_the_page_and_the_rest_api_say_the_same_sentence(tmp_path, capsys):
    from lib_lora.cli import main
    from lib_lora.hosts.webui_app import config_from_request, form_values_to_config
    from lib_lora.ui import forms
    from lib_lora.ui.paths import FolderPolicy

    sentence = "--dim = '12.5' is not a whole number."
    ds = tmp_path / "ds"
    ds.mkdir()
    assert main(["train", str(ds), "--dim", "12.5"]) == 2
    assert capsys.readouterr().err == f"error: {sentence}\n"
    with pytest.raises(UserError) as page:
        forms.collect(TrainConfig, ["dim"], ["12.5"], policy=FolderPolicy(), name="x", dataset=str(ds))
    assert str(page.value) == sentence and forms.ui_text(str(page.value)) == "“Network dim” = '12.5' is not a whole number."
    with pytest.raises(UserError) as rest:
        config_from_request({"preset": "style", "name": "x", "dataset": str(ds), "dim": "12.5"})
    assert str(rest.value) == sentence
    assert config.phrase_options(sentence, config.api_phrase) == "\"dim\" = '12.5' is not a whole number."
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name == "dim"]
    with pytest.raises(UserError) as fallback:
        form_values_to_config(fields, ["12.5"])
    assert str(fallback.value) == sentence
    # A value of the right meaning in another JSON type is taken as the field's type.
    cfg = config_from_request({"preset": "style", "name": "x", "dataset": str(ds), "dim": "128", "lr": 1e-4,
                               "overwrite": "true", "max_steps": None})
    assert (cfg.dim, cfg.lr, cfg.overwrite, cfg.max_steps) == (128, "0.0001", True, None)


def test_every_field_reads_back_alike_from_flags_controls_and_a_body(tmp_path):
    """A config of non-default values, written out as each front end receives it, comes back equal."""
    from lib_lora.hosts.webui_app import config_from_request
    from lib_lora.training.cli import config_from_args, register
    from lib_lora.ui import forms
    from lib_lora.ui.paths import FolderPolicy

    ds = tmp_path / "ds"
    ds.mkdir()
    want = dataclasses.replace(
        TrainConfig(), name="x", dataset=str(ds), dim=8, alpha=4.5, max_steps=30, text_encoder_lr=2e-5, lr="3e-4",
        overwrite=True, enable_buckets=False, optimizer="adamw", min_snr_gamma=5.0, mixed_precision="no",
        comment="a, b", output_dir=str(tmp_path / "o"), run_dir=str(tmp_path / "r"), base_model="tiny")
    values = config.to_dict(want)
    names = [n for n in values if n not in ("name", "dataset")]
    # The page's controls: their values as forms.values_of gives them (text for optional numbers).
    by_page = forms.collect(TrainConfig, names, forms.values_of(want, names), policy=FolderPolicy(),
                            name="x", dataset=str(ds))
    # CLI flags: every value as text.
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    argv = ["train", str(ds)]
    for n in names + ["name"]:
        v = values[n]
        argv += [config.flag_of(n), "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)]
    by_cli = config_from_args(parser.parse_args(argv))
    # A REST body: JSON values.
    by_rest = config_from_request({"preset": "style", **values})
    assert by_page == want and by_cli == want and by_rest == want
