"""SDXL trains through the loop on the built-in tiny-sdxl: it learns, each sample's size/crop
time ids reach the U-Net, cached text-encoder outputs equal uncached ones, a resume is
byte-identical, the LR probe runs, and the file holds exactly the backbone's U-Net targets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from progress_helpers import StopAt

from lib_lora.config import TrainConfig
from lib_lora.errors import Cancelled, UserError
from lib_lora.training.export import read_lora
from lib_lora.training.family import SDXL
from lib_lora.training.run import Trainer, train


@pytest.fixture(scope="module")
def tiny_sdxl():
    from lib_lora.training.models_sdxl import load_backbone

    return load_backbone("tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl_dataset(tmp_path_factory):
    """4 drawn images, each of another original size (so each has its own time ids); with the
    config below they fall into two buckets (64² and 32²) of two images each."""
    from PIL import Image

    from lib_lora.demo import make_dataset

    root = make_dataset(tmp_path_factory.mktemp("xl"), count=4, size=64, repeats=2)
    sub = next(p for p in root.iterdir() if p.is_dir())
    for i, img in enumerate(sorted(sub.glob("*.png"))):  # other original sizes: other time ids
        with Image.open(img) as im:
            im.convert("RGB").resize([(64, 64), (80, 64), (64, 80), (128, 128)][i]).save(img)
    return root


def _cfg(tmp_path, dataset, **kw) -> TrainConfig:
    base = dict(
        name="xl_test", dataset=str(dataset), output_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"),
        base_model="tiny-sdxl", resolution=64, min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=32, dim=4, alpha=4.0,
        lr="1e-3", optimizer="adamw", lr_scheduler="constant", device="cpu", log_every_n_steps=5,
        max_steps=6, train_text_encoder=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_loss_on_fixed_pairs_falls(tmp_path, drawn_dataset, tiny_sdxl):
    # 4 drawn 64 px images x 2 repeats (one bucket), as the SD1.5 loop test.
    tr = Trainer(_cfg(tmp_path, drawn_dataset, max_steps=40, lr="3e-3", dim=8, alpha=8.0), backbone=tiny_sdxl)
    tr.state.session_id = "test"
    tr.setup()
    try:
        before = tr.fixed_loss()
        tr.train_loop()
        after = tr.fixed_loss()
    finally:
        tr.close()
    assert after < 0.9 * before, (before, after)


def test_each_samples_time_ids_reach_the_unet(tmp_path, sdxl_dataset, tiny_sdxl):
    from lib_lora.training import data as data_mod
    from lib_lora.training.backbone_sdxl import size_conditioning, time_ids

    seen = []
    hook = tiny_sdxl.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
    tr = Trainer(_cfg(tmp_path, sdxl_dataset, batch_size=2), backbone=tiny_sdxl)
    tr.state.session_id = "test"
    try:
        tr.setup()
        batches = list(data_mod.iter_batches(tr.state.dataset.items, tr.cfg, 3, tr.cfg.seed))
        for b in batches:
            seen.clear()
            tr.train_step(b)
            want = torch.stack([time_ids(*size_conditioning(it.size, it.bucket)) for it in b.items])
            assert len(seen) == 1 and torch.equal(seen[0], want)
    finally:
        hook.remove()
        tr.close()
    # Each batch's two images differ in original size, so constant time ids would fail above.
    assert all(len({tuple(it.size) for it in b.items}) == 2 for b in batches)


def test_cached_text_encoder_equals_uncached(tmp_path, sdxl_dataset, float32_rounding):
    from lib_lora.training.models_sdxl import load_backbone

    tiny_sdxl = load_backbone("tiny-sdxl")  # its own: the two runs compared start from the same model state
    cached = train(_cfg(tmp_path / "c", sdxl_dataset), backbone=tiny_sdxl)
    plain = train(_cfg(tmp_path / "p", sdxl_dataset, cache_text_encoder_outputs=False), backbone=tiny_sdxl)
    a, b = read_lora(cached.lora_path)[0], read_lora(plain.lora_path)[0]
    tol = float32_rounding(tiny_sdxl.unet, tiny_sdxl.text_encoder, tiny_sdxl.text_encoder_2) * 6  # 6 steps
    assert a.keys() == b.keys()
    # Normwise per tensor: AdamW divides each element's step by its own gradient size, so an
    # element whose gradient is near zero can move by up to lr on rounding alone; only the
    # tensor as a whole is bounded by the rounding of the computation.
    for k in a:
        assert (a[k] - b[k]).norm() <= tol * a[k].norm(), k


def test_lora_keys_are_the_unet_targets_and_metadata_says_sdxl(tmp_path, sdxl_dataset, tiny_sdxl):
    res = train(_cfg(tmp_path, sdxl_dataset, max_steps=2), backbone=tiny_sdxl)
    tensors, md = read_lora(res.lora_path)
    names = {t.name for t in tiny_sdxl.lora_targets() if t.name.startswith("lora_unet_")}
    assert {k.split(".")[0] for k in tensors} == names
    assert md["ss_base_model_version"] == SDXL.base_model_version
    assert md["modelspec.architecture"] == SDXL.modelspec_architecture


def test_text_encoders_train_when_asked(tmp_path, sdxl_dataset, tiny_sdxl):
    res = train(_cfg(tmp_path, sdxl_dataset, max_steps=2, train_text_encoder=True), backbone=tiny_sdxl)
    prefixes = {k.split("_")[1] for k in read_lora(res.lora_path)[0]}
    assert prefixes == {"unet", "te1", "te2"}



def test_resume_is_byte_identical(tmp_path, sdxl_dataset, tiny_sdxl, one_thread):
    from safetensors.torch import load_file

    ref = train(_cfg(tmp_path / "a", sdxl_dataset, max_steps=8), backbone=tiny_sdxl)
    cfg = _cfg(tmp_path / "b", sdxl_dataset, max_steps=8, state_every_n_steps=2)
    with pytest.raises(Cancelled):
        train(cfg, progress=StopAt(3), backbone=tiny_sdxl)
    res = train(cfg, backbone=tiny_sdxl)
    a, b = load_file(ref.lora_path), load_file(res.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lr_probe_runs(tmp_path, sdxl_dataset, tiny_sdxl):
    events = []
    res = train(_cfg(tmp_path, sdxl_dataset, lr="auto", max_steps=2), backbone=tiny_sdxl, on_event=events.append)
    lr = float(read_lora(res.lora_path)[1]["ss_unet_lr"]) if "ss_unet_lr" in read_lora(res.lora_path)[1] else None
    assert lr is not None and lr > 0
    assert any("probe" in e.get("text", "").lower() for e in events if e["kind"] == "phase")


def test_config_defaults_are_the_familys(tmp_path):
    from lib_lora.config import for_family
    from lib_lora.training.cli import config_from_args
    from lib_lora.training.family import SD15
    from lib_lora.training.run_config import prepare_train_config

    cfg = prepare_train_config(None, TrainConfig(name="x", base_model="tiny-sdxl"))
    assert (cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso) == (1024, 512, 2048)
    assert cfg.train_text_encoder is False
    kept = for_family(dataclasses.replace(cfg, resolution=768), SDXL)
    assert kept.resolution == 768  # a value the user gave stays
    sd15 = TrainConfig(name="x")
    assert for_family(sd15, SD15) == sd15 == prepare_train_config(None, sd15)
    # Given fields are kept even where they equal SD1.5's defaults (512 px, text encoder on);
    # the fields not given take SDXL's.
    chosen = TrainConfig(name="x", base_model="tiny-sdxl", resolution=512, train_text_encoder=True)
    given = prepare_train_config(None, chosen, given={"name", "base_model", "resolution", "train_text_encoder"})
    assert (given.resolution, given.train_text_encoder, given.min_bucket_reso) == (512, True, 512)
    # ...and a preset is the family's recipe under them.
    styled = prepare_train_config(None, chosen, given={"name", "base_model", "resolution"}, preset="style")
    assert (styled.resolution, styled.dim, styled.train_text_encoder) == (512, SDXL.presets["style"]["dim"], False)
    # The CLI knows which flags were given: --train-text-encoder keeps SDXL's encoders on.
    from lib_lora.cli import build_parser

    def parsed(*flags):
        return config_from_args(build_parser().parse_args(["train", str(tmp_path), "--base-model", "tiny-sdxl", *flags]))

    assert parsed().train_text_encoder is False and parsed().resolution == 1024
    assert parsed("--train-text-encoder").train_text_encoder is True
    assert parsed("--resolution", "512").resolution == 512


def _cli(*args: str, timeout: int = 900):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "lib_lora", *args], capture_output=True, text=True, cwd=root,
                          timeout=timeout)


def test_cli_plan_shows_the_sdxl_defaults(drawn_dataset):
    proc = _cli("train", str(drawn_dataset), "--base-model", "tiny-sdxl", "--plan-only", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Model family: SDXL; resolution 1024, buckets 512-2048 px, training the U-Net only." in proc.stdout
    assert "the text encoder is not trained" in proc.stdout


def test_cli_train_and_demo_write_the_backbones_unet_targets(tmp_path, drawn_dataset, tiny_sdxl):
    names = {t.name for t in tiny_sdxl.lora_targets() if t.name.startswith("lora_unet_")}
    out = tmp_path / "lora"
    proc = _cli("train", str(drawn_dataset), "--name", "xl", "--base-model", "tiny-sdxl", "--output-dir", str(out),
                "--run-dir", str(tmp_path / "run"), "--max-steps", "2", "--resolution", "512", "--dim", "4",
                "--lr", "1e-3", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    tensors, md = read_lora(out / "xl.safetensors")
    assert {k.split(".")[0] for k in tensors} == names and md["ss_base_model_version"] == "sdxl_base_v1-0"
    # --resolution 512 is SD1.5's default, given here on SDXL: kept (the 64 px images keep their own bucket).
    assert md["ss_resolution"] == "(512, 512)" and md["ss_min_bucket_reso"] == "512"

    proc = _cli("demo", "--family", "sdxl", "--out", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr
    tensors, md = read_lora(tmp_path / "demo" / "lora" / "fastlora_chan.safetensors")
    assert {k.split(".")[0] for k in tensors} == names
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert list((tmp_path / "demo" / "runs" / "fastlora_chan" / "samples").glob("*.png"))  # SDXL sampling ran


def test_standalone_host_gives_the_train_tab_an_sdxl_backbone_and_its_defaults(tmp_path):
    from lib_lora.hosts.standalone import StandaloneHost
    from lib_lora.training.backbone_sdxl import SDXLBackbone
    from lib_lora.training.run_config import prepare_train_config

    host = StandaloneHost(base_model="tiny-sdxl", output_dir=tmp_path / "out", work_dir=tmp_path / "work", device="cpu")
    bb = host.backbone("tiny-sdxl")  # what the Train tab asks for, then prepare_train_config as there
    assert isinstance(bb, SDXLBackbone)
    cfg = prepare_train_config(host, TrainConfig(name="x", base_model="tiny-sdxl"), bb)
    assert (cfg.resolution, cfg.train_text_encoder) == (1024, False)
    # The standalone Test tab's pipeline is SD1.5's: on SDXL it says so in one sentence.
    with pytest.raises(UserError, match="only in the WebUI"):
        host.generate(["a photo"], seed=1, base_model="tiny-sdxl")


def test_a_legacy_pickle_sdxl_ckpt_is_told_sdxl_and_loads(tmp_path):
    """A pre-zip (legacy pickle) .ckpt cannot be memory-mapped: its family is read through the
    weights-only read (never the SD1.5 loader's refusal), and a pickle of anything but tensors
    is still refused before any code in it runs."""
    import pickle
    import zipfile

    from safetensors.torch import load_file

    from lib_lora.errors import ModelLoadError
    from lib_lora.training.backbone_sdxl import SDXLBackbone
    from lib_lora.training.models_sdxl import load_backbone, model_family
    from lib_lora.training.tiny_model import ensure_tiny_checkpoint

    sd = load_file(str(ensure_tiny_checkpoint(family="sdxl")))
    legacy = tmp_path / "tiny_sdxl_legacy.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, legacy, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(legacy)
    assert model_family(str(legacy)) == SDXL.name
    bb = load_backbone(str(legacy))
    assert isinstance(bb, SDXLBackbone)
    assert torch.equal(bb.unet.conv_in.weight, load_backbone("tiny-sdxl").unet.conv_in.weight)

    class Evil:
        def __reduce__(self):
            return (print, ("this would run on load",))

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": {"conditioner.embedders.0.transformer.x": Evil()}}))
    with pytest.raises(ModelLoadError, match="refused"):
        load_backbone(str(evil))
