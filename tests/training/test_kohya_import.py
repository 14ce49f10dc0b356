"""kohya's configs as ours: the kohya_ss GUI's .json and sd-scripts' --config_file and
--dataset_config .toml map field by field; what we cannot use is named in one message."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from lib_lora.cli import main
from lib_lora.config import TrainConfig
from lib_lora.config_files import read_config_file
from lib_lora.kohya_config import SUBSET_KEYS, TABLE, import_kohya
from lib_lora.training.export import read_metadata

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kohya"
FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


@pytest.fixture
def kohya_dir(tmp_path, drawn_dataset, monkeypatch):
    """The fixtures beside an image folder, as a kohya user's folder: their paths are relative."""
    shutil.copytree(FIXTURES, tmp_path, dirs_exist_ok=True)
    shutil.copytree(drawn_dataset, tmp_path / "img")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_key_maps_when_its_field_exists_and_is_reported_when_it_does_not():
    data = {"network_dim": 8, "network_alpha": 4, "pretrained_model_name_or_path": "m.safetensors"}
    now = import_kohya(data, "sd-scripts", Path("a.toml"))
    assert now.values["dim"] == 8 and now.unsupported == []
    # The same file read by a schema without `dim`: the key is named, its value never set.
    without = import_kohya(data, "sd-scripts", Path("a.toml"), fields=FIELDS - {"dim"})
    assert "dim" not in without.values and without.unsupported == ["network_dim = 8"]
    assert without.values["alpha"] == 4.0


SAMPLES = {"caption_extension": ".caption", "optimizer_type": "prodigy", "optimizer": "AdamW", "lr_scheduler": "cosine",
           "mixed_precision": "bf16", "save_precision": "float", "max_token_length": 150, "loss_type": "huber",
           "huber_schedule": "constant"}  # fmt: skip


@pytest.mark.parametrize("key", sorted(TABLE))
def test_every_table_key_follows_the_schema(key):
    """Whatever fields TrainConfig has when this runs (other options are added over time):
    a key whose field exists sets it, one whose field does not is reported."""
    rule = TABLE[key]
    value = SAMPLES.get(key, 3)
    if rule.target in ("base_model", "dataset", "reg_data_dir", "output_dir", "name", "comment", "class_tokens",
                       "keep_tokens_separator", "caption_prefix", "caption_suffix"):
        value = "text"
    got = import_kohya({key: value}, "sd-scripts", Path("k.toml"))
    if rule.target in FIELDS:
        assert rule.target in got.values and got.unsupported == [], (key, got)
    else:
        assert rule.target not in got.values and got.unsupported == [f"{key} = {value!r}"], (key, got)


def test_kohya_ss_gui_json_maps_field_by_field():
    cf = read_config_file(FIXTURES / "kohya_ss_lora.json")
    v = cf.values
    assert cf.format == "kohya_ss"
    assert (v["dim"], v["alpha"], v["lr"], v["text_encoder_lr"], v["max_steps"], v["resolution"]) == \
        (4, 2.0, "0.0005", 0.0001, 4, 64)
    assert (v["dataset"], v["name"], v["optimizer"], v["seed"], v["keep_tokens"], v["network_type"]) == \
        ("./img", "kohya_gui_lora", "adamw", 1234, 1, "lora")
    assert v["lr_warmup_steps"] == 0.1  # the GUI's warm-up box is 10 % of the steps
    assert "conv_dim" not in v  # a Standard LoRA: the GUI does not pass its conv boxes either
    # Named in one message: keys with a value we cannot use; defaults and off/empty keys are not.
    assert cf.report().splitlines()[0] == \
        "Not supported here, so not used from kohya_ss_lora.json: logging_dir = './log', random_crop = true."


def test_gui_learning_rates_follow_the_guis_rules():
    def lrs(**kw):
        v = import_kohya({"learning_rate": 1e-4, **kw}, "kohya_ss", Path("g.json")).values
        return v.get("lr"), v.get("text_encoder_lr"), v.get("train_text_encoder", True), v.get("train_unet", True)

    assert lrs(unet_lr=0, text_encoder_lr=0) == ("0.0001", 1e-4, True, True)  # both at learning_rate
    assert lrs(unet_lr=2e-4, text_encoder_lr=0) == ("0.0002", None, False, True)  # U-Net only
    assert lrs(unet_lr=0, text_encoder_lr=5e-5)[1:] == (5e-5, True, False)  # text encoder only
    assert lrs() == ("0.0001", 1e-4, True, True)  # kohya: the text encoder at learning_rate, not ours 0.1x


def test_sd_scripts_learning_rates_and_network_args(kohya_dir):
    v = read_config_file("sd_scripts_args.toml").values  # its dataset_config is relative to the working folder
    assert (v["lr"], v["text_encoder_lr"], v["conv_dim"], v["conv_alpha"], v["weight_decay"]) == \
        ("0.0004", 0.0002, 2, 1.0, 0.05)
    got = import_kohya({"learning_rate": 1e-4, "text_encoder_lr": 0, "network_module": "lycoris.kohya",
                        "network_args": ["algo=locon", "dora_wd=True", "preset=attn-only"]}, "sd-scripts", Path("x"))
    assert got.values["train_text_encoder"] is False and got.values["network_type"] == "dora"
    assert got.unsupported == ["network_args preset = 'attn-only'"]
    other = import_kohya({"network_module": "networks.dylora", "optimizer_type": "Lion"}, "sd-scripts", Path("x"))
    assert other.unsupported == ["optimizer_type = 'Lion'", "network_module = 'networks.dylora'"]


def test_dataset_config_with_several_subsets_needs_the_subsets_option():
    path = FIXTURES / "sd_scripts_dataset_reg.toml"
    data = __import__("tomllib").loads(path.read_text(encoding="utf-8"))
    # A schema with `subsets` and the per-subset caption fields (the entries' keys name them).
    later = FIELDS | {"subsets", "flip_aug", "caption_prefix"}
    got = import_kohya(data, "sd-scripts-dataset", path, fields=later)
    assert got.values["subsets"] == [
        {"caption_extension": ".txt", "keep_tokens": 1, "image_dir": "./img/2_fastlora_chan",
         "class_tokens": "fastlora_chan", "repeats": 4, "shuffle_caption": True, "flip_aug": True},
        {"caption_extension": ".txt", "keep_tokens": 2, "image_dir": "./more", "repeats": 2,
         "caption_prefix": "photo, "},
        {"caption_extension": ".txt", "keep_tokens": 1, "is_reg": True, "image_dir": "./reg",
         "class_tokens": "person", "repeats": 1},  # sd-scripts' num_repeats default
    ]
    assert got.unsupported == ["datasets.subsets #2 color_aug = true"]
    assert got.values["resolution"] == 78 and "not square" in got.report()
    # Without `subsets` in the schema: named, and the first image folder is what trains.
    now = import_kohya(data, "sd-scripts-dataset", path, fields=FIELDS - {"subsets"})
    assert "subsets" not in now.values and now.values["dataset"] == "./img/2_fastlora_chan"
    assert any("3 [[datasets.subsets]]" in u for u in now.unsupported)


def test_kohya_ss_json_imports_and_trains(kohya_dir, capsys):
    # Flags override the file: the tiny model instead of the user's checkpoint, fp32 on this CPU.
    assert main(["train", "--config", "kohya_ss_lora.json", "--base-model", "tiny", "--mixed-precision", "no",
                 "--device", "cpu", "--run-dir", "run_gui"]) == 0
    printed = capsys.readouterr()
    assert "note: Not supported here, so not used from kohya_ss_lora.json: logging_dir" in printed.err
    md = read_metadata(kohya_dir / "model" / "kohya_gui_lora.safetensors")
    assert (md["ss_network_dim"], md["ss_network_alpha"], md["ss_steps"], md["ss_seed"]) == ("4", "2.0", "4", "1234")
    assert md["ss_text_encoder_lr"] == "0.0001" and md["ss_unet_lr"] == "0.0005"


def test_sd_scripts_toml_pair_imports_and_trains(kohya_dir, capsys):
    assert main(["train", "--config", "sd_scripts_args.toml", "--base-model", "tiny", "--mixed-precision", "no",
                 "--device", "cpu", "--optimizer", "adamw", "--run-dir", "run_sd"]) == 0
    printed = capsys.readouterr()
    assert "full_fp16 = true" in printed.err
    md = read_metadata(kohya_dir / "model" / "sd_scripts_lora.safetensors")
    # From the dataset config: 4 images x 3 repeats, batch 2 (its [[datasets]]), 4 steps (the args file).
    assert (md["ss_num_train_images"], md["ss_batch_size_per_device"], md["ss_steps"]) == ("12", "2", "4")
    assert (md["ss_network_dim"], md["ss_clip_skip"], md["ss_seed"]) == ("4", "2", "7")
    # Converted once to our TOML, the same options come back.
    assert main(["train", "--config", "sd_scripts_args.toml", "--save-config", "ours.toml"]) == 0
    ours = read_config_file(kohya_dir / "ours.toml")
    assert ours.format == "fastlora" and ours.values["repeats"] == 3 and ours.values["dim"] == 4


def test_subset_keys_name_fields_of_the_schema():
    """Each subset key but the two only a subset has names a run-level field (its default)."""
    from lib_lora.kohya_config import SUBSET_ONLY

    assert set(SUBSET_KEYS.values()) - set(SUBSET_ONLY) <= {k.target for k in TABLE.values()} | {"class_tokens"}
