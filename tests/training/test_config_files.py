"""Training configs as files: `train --config FILE` / `--save-config FILE`, every field round-trips
through our TOML, the run folder's config.json reloads, and file values are checked as flags are."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

import pytest

from lib_lora import config_files
from lib_lora.cli import main
from lib_lora.config import TrainConfig, field_type, to_dict, validate
from lib_lora.errors import UserError


def parse(argv: list[str]) -> argparse.Namespace:
    from lib_lora.training.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


def cli_config(argv: list[str], reports: list[str] | None = None) -> TrainConfig:
    from lib_lora.training.cli import config_from_args

    return config_from_args(parse(argv), reports)


def other_value(f: dataclasses.Field) -> typing.Any:
    """A value of field `f` unlike its default that validates: text with the characters TOML
    must escape, the next choice, a number inside the bounds."""
    typ, optional = field_type(TrainConfig, f)
    default = TrainConfig.__dataclass_fields__[f.name].default
    meta = f.metadata
    if f.name == "lr":
        return "3e-4"
    if meta.get("choices"):
        choices = list(meta["choices"])
        return choices[(choices.index(default) + 1) % len(choices)] if default in choices else choices[0]
    if typ is bool:
        return not default
    if typing.get_origin(typ) is list:
        return ["a", 'b "c"']
    if typ in (int, float):
        lo, hi = meta.get("min"), meta.get("max")
        step = 1 if typ is int else 0.25
        start = default if default is not None else (lo or 0) + step
        value = start + step
        return typ(start - step if hi is not None and value > hi else value)
    if meta.get("path"):  # a path a later check may look at: one that exists
        return str(Path(__file__).parent) if meta["path"] != "file" else __file__
    return f'{f.name} "quoted" \\ tab\t ünïcode'


def changed_config() -> TrainConfig:
    values = {}
    for f in dataclasses.fields(TrainConfig):
        typ, _ = field_type(TrainConfig, f)
        if typing.get_origin(typ) is list and typing.get_args(typ) and typing.get_args(typ)[0] is not str:
            continue  # a list of tables (subsets) has its own test with its own keys
        values[f.name] = other_value(f)
    values.update(min_bucket_reso=128, max_bucket_reso=1536, train_unet=True, train_text_encoder=False)
    return validate(dataclasses.replace(TrainConfig(), **values))


@pytest.mark.parametrize("backend", ["tomllib", "toml"])
def test_every_field_round_trips_through_our_toml(tmp_path, backend):
    cfg = changed_config()
    assert all(getattr(cfg, f.name) != f.default for f in dataclasses.fields(TrainConfig)
               if f.default is not dataclasses.MISSING and f.name not in ("train_unet",))
    path = config_files.save_config_file(cfg, tmp_path / "run.toml")
    text = path.read_text(encoding="utf-8")
    assert "# LoRA rank (network dim)" in text  # each field with its help text
    data = config_files.toml_loads(text, backend)  # Python 3.10's reader (lycoris-lora's toml) too
    assert set(data) == {f.name for f in dataclasses.fields(TrainConfig)}
    loaded = config_files.file_config([config_files.ConfigFile(path, "fastlora", data)], TrainConfig())
    assert to_dict(loaded) == to_dict(cfg)


def test_optional_fields_left_empty_read_back_as_not_set(tmp_path):
    cfg = TrainConfig(max_steps=None, text_encoder_lr=None, min_snr_gamma=None)
    path = config_files.save_config_file(cfg, tmp_path / "run.toml")
    cf = config_files.read_config_file(path)
    assert config_files.file_config([cf], TrainConfig(max_steps=9, min_snr_gamma=5.0)).max_steps is None


def test_list_of_tables_is_written_as_toml_sections():
    text = config_files.toml_dumps({"dim": 4, "subsets": [{"image_dir": "a b", "repeats": 3}, {"is_reg": True}]})
    assert config_files.toml_loads(text) == {"dim": 4, "subsets": [{"image_dir": "a b", "repeats": 3},
                                                                    {"is_reg": True}]}


def test_flags_override_the_file_and_the_file_overrides_defaults(tmp_path, drawn_dataset):
    path = tmp_path / "run.toml"
    path.write_text(f'dataset = "{drawn_dataset.as_posix()}"\nname = "from_file"\ndim = 16\nalpha = 8\n'
                    'lr_scheduler = "cosine"\n', encoding="utf-8")
    cfg = cli_config(["--config", str(path), "--dim", "8"])
    assert (cfg.dim, cfg.alpha, cfg.lr_scheduler, cfg.name) == (8, 8.0, "cosine", "from_file")
    assert cfg.dataset == drawn_dataset.as_posix()
    # The positional DATASET given on the command line wins over the file's too.
    other = drawn_dataset / "2_fastlora_chan"
    assert cli_config([str(other), "--config", str(path)]).dataset == str(other)


def test_a_bad_file_gets_one_sentence(tmp_path, capsys):
    assert main(["train", "--plan-only"]) == 2
    assert "No dataset folder given: pass DATASET, or a --config file that names one." in capsys.readouterr().err
    cases = {
        "typo.toml": ('dimm = 4\nalphaa = 2\nlr = "1e-4"\n', "has options Fast LoRA does not know: dimm, alphaa;"),
        "value.toml": ('dim = "many"\n', "In value.toml: dim = 'many' is not a whole number."),
        "bound.toml": ("dim = 0\n", "In bound.toml: dim = 0 is below its minimum 1."),
        "syntax.toml": ("dim = = 4\n", "is not valid TOML"),
        "choice.json": ('{"optimizer": "lion"}', "In choice.json: optimizer = 'lion' is not one of: adamw8bit"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert main(["train", "--config", str(tmp_path / name), "--plan-only"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err


def test_save_config_writes_the_merged_options_and_stops(tmp_path, drawn_dataset, capsys):
    out = tmp_path / "saved.toml"
    argv = ["train", str(drawn_dataset), "--preset", "style", "--dim", "8", "--resolution", "64",
            "--run-dir", str(tmp_path / "run")]
    assert main([*argv, "--save-config", str(out)]) == 0
    assert "config written" in capsys.readouterr().out and not (tmp_path / "run").exists()  # no training
    cfg = cli_config(argv[1:])
    assert to_dict(cli_config(["--config", str(out)])) == to_dict(cfg)
    # Saving again replaces our own file; a file that is not ours (a kohya config) is left alone.
    assert main([*argv, "--dim", "12", "--save-config", str(out)]) == 0
    assert cli_config(["--config", str(out)]).dim == 12
    kohya = tmp_path / "kohya.json"
    kohya.write_text('{"network_dim": 4}', encoding="utf-8")
    capsys.readouterr()
    assert main([*argv, "--save-config", str(kohya)]) == 2
    assert "is not a Fast LoRA config" in capsys.readouterr().err
    assert kohya.read_text(encoding="utf-8") == '{"network_dim": 4}'


def test_the_run_folders_config_reloads(tmp_path, drawn_dataset, capsys):
    run, out = tmp_path / "run", tmp_path / "lora"
    argv = ["train", str(drawn_dataset), "--name", "again", "--base-model", "tiny", "--output-dir", str(out),
            "--run-dir", str(run), "--max-steps", "2", "--resolution", "64", "--dim", "4", "--alpha", "2",
            "--lr", "5e-4", "--optimizer", "adamw", "--lr-scheduler", "linear"]
    assert main(argv) == 0
    capsys.readouterr()
    saved = json.loads((run / "config.json").read_text(encoding="utf-8"))
    cfg = cli_config(["--config", str(run / "config.json")])
    assert to_dict(cfg) == saved
    assert cli_config(["--config", str(run / "config.json"), "--dim", "6"]).dim == 6
    # ... and trains again from it (a finished run: nothing left to do but say so, no error).
    (out / "again.safetensors").unlink()
    assert main(["train", "--config", str(run / "config.json"), "--overwrite"]) == 0


def test_toml_reader_message_when_none_is_installed():
    with pytest.raises(UserError, match="needs the tomli package"):
        config_files.toml_loads("a = 1", backend="no_such_toml_module")


def test_config_file_cannot_be_a_folder_or_an_odd_suffix(tmp_path):
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        config_files.save_config_file(TrainConfig(), tmp_path / "dir.toml")
    with pytest.raises(UserError, match=r"\.toml \(or \.json\)"):
        config_files.save_config_file(TrainConfig(), tmp_path / "run.yaml")
    assert not (tmp_path / "run.yaml").exists()


def test_cli_user_presets(tmp_path, drawn_dataset, capsys):
    presets = tmp_path / "presets"
    base = ["train", str(drawn_dataset), "--presets-dir", str(presets)]
    assert main([*base, "--preset", "style", "--dim", "24", "--lr", "2e-4", "--save-preset", "my style"]) == 0
    assert "preset saved" in capsys.readouterr().out and (presets / "my style.toml").is_file()
    text = (presets / "my style.toml").read_text(encoding="utf-8")
    assert "\ndim = 24\n" in text and "\ndataset = " not in text and "\nname = " not in text  # the recipe only
    cfg = cli_config([str(drawn_dataset), "--presets-dir", str(presets), "--preset", "my style", "--alpha", "3"])
    style = cli_config([str(drawn_dataset), "--preset", "style"])
    assert (cfg.dim, cfg.lr, cfg.alpha, cfg.lr_scheduler) == (24, "2e-4", 3.0, style.lr_scheduler)
    for argv, words in (([*base, "--preset", "nope", "--plan-only"], "There is no preset 'nope'; choose one of person"),
                        ([*base, "--save-preset", "Person"], "Person is a built-in preset; give yours another name."),
                        ([*base, "--save-preset", "a/b"], "which could leave the output folder")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err


def test_a_data_parallel_config_json_splits_under_a_launcher_unless_batch_size_is_given(tmp_path, monkeypatch):
    import json

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"name": "two", "dataset": str(tmp_path), "batch_size": 4, "processes": 2}),
                    encoding="utf-8")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_config(["--config", str(path)]).batch_size == 2  # the recorded global batch, shared out
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="does not split over 3 processes"):
        cli_config(["--config", str(path)])
    assert cli_config(["--config", str(path), "--batch-size", "2"]).batch_size == 2  # the flag: per process, as said
