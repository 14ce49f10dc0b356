"""Sample images during training (training/sample.py): when, what, and that they change nothing."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lib_lora.config import TrainConfig
from lib_lora.demo import DEMO_NAME
from lib_lora.training import sample, schedule
from lib_lora.training.run import Trainer, train

# Two runs compared byte for byte: one torch thread (see tests/conftest.py one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

def test_sample_steps_are_evenly_spaced_and_end_at_the_last_step():
    assert sample.sample_steps(10, 4, 0, 0, 5) == {2, 5, 8, 10}
    assert sample.sample_steps(10, 1, 0, 0, 5) == {10}
    assert sample.sample_steps(10, 0, 3, 0, 5) == {3, 6, 9}
    assert sample.sample_steps(12, 0, 0, 2, 3) == {6, 12}
    assert sample.sample_steps(3, 8, 0, 0, 3) == {1, 2, 3}  # more samples than steps: one per step
    assert sample.sample_steps(10, 0, 0, 0, 5) == set()


def test_prompts_split_on_bars_and_lines_with_the_trigger_filled_in():
    assert sample.prompts_from("", "zhang") == ["zhang"]
    assert sample.prompts_from("{trigger}, smile | {trigger}, hat\nlandscape|", "zhang") == [
        "zhang, smile", "zhang, hat", "landscape"]  # fmt: skip


def test_sampler_matches_diffusers_pipeline(tiny_backbone):
    """Our DDIM + guidance + decode gives the image diffusers' own pipeline gives."""
    from diffusers import StableDiffusionPipeline

    from lib_lora.training.data import CaptionTokens

    bb = tiny_backbone
    gen = torch.Generator("cpu").manual_seed(3)
    noise = torch.randn((1, 4, 8, 8), generator=gen)
    tokens = CaptionTokens(bb.tokenizer)
    ids = tokens.batch(["", "a girl, red dress"])
    with torch.no_grad():
        uncond, cond = bb.encode_text(ids).chunk(2)
    ours = sample.to_image(bb.decode_latents(sample.denoise(bb.predict_noise, cond, uncond, noise, 6, 5.0))[0])

    pipe = StableDiffusionPipeline(vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, unet=bb.unet,
                                   scheduler=schedule.ddim(6), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise.clone(), num_inference_steps=6,
               guidance_scale=5.0, height=64, width=64, output_type="pil").images[0]  # fmt: skip
    diff = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(ref, dtype=np.int16))
    assert ours.size == ref.size == (64, 64) and diff.max() <= 1


def _cfg(tmp_path: Path, dataset: Path, name: str, **kw) -> TrainConfig:
    base = dict(name=name, dataset=str(dataset), output_dir=str(tmp_path / "out"), run_dir=str(tmp_path / name),
                resolution=64, dim=4, alpha=2.0, lr="1e-3", optimizer="adamw", max_steps=4, network_dropout=0.1,
                log_every_n_steps=2, cache_latents_to_disk=False, device="cpu", save_precision="fp32")  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_a_run_with_samples_trains_exactly_like_one_without(tmp_path, tiny_backbone, drawn_dataset):
    events: list[dict] = []
    with_samples = train(_cfg(tmp_path, drawn_dataset, "with", sample_images=2, sample_steps=4,
                              sample_prompts="{trigger}, smile|{trigger}, hat"), tiny_backbone, on_event=events.append)  # fmt: skip
    plain = train(_cfg(tmp_path, drawn_dataset, "plain"), tiny_backbone)
    a, b = load_file(str(with_samples.lora_path)), load_file(str(plain.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    samples = [e for e in events if e["kind"] == "sample"]
    assert [(e["step"], Path(e["path"]).name) for e in samples] == [
        (2, "with-step000002-00.png"), (2, "with-step000002-01.png"),
        (4, "with-step000004-00.png"), (4, "with-step000004-01.png")]  # fmt: skip
    first_tag = samples[0]["prompt"].split(",")[0]  # {trigger}: the captions' common first tag
    assert first_tag == DEMO_NAME and samples[0]["prompt"] == f"{first_tag}, smile" and samples[1]["prompt"] == f"{first_tag}, hat"
    for e in samples:
        with Image.open(e["path"]) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
        assert Path(e["path"]).parent == tmp_path / "with" / "samples"
    assert not list((tmp_path / "with" / "samples").glob("*fastlora-tmp*"))

    # Beside the LoRA, for the WebUI's card: the .json, and the last sample (first prompt) as preview.
    import json

    out = tmp_path / "out"
    assert json.loads((out / "with.json").read_text(encoding="utf-8"))["activation text"] == "with"
    assert (out / "with.preview.png").read_bytes() == Path(samples[2]["path"]).read_bytes()
    assert (out / "plain.json").is_file() and not (out / "plain.preview.png").exists()


def test_sampling_restores_every_module_mode(tmp_path, tiny_backbone, drawn_dataset):
    tr = Trainer(_cfg(tmp_path, drawn_dataset, "modes", sample_images=1, sample_steps=2), tiny_backbone)
    tr.state.started_at, tr.state.name = time.time(), "modes"
    tr.load_all()
    tr.state.network.train()  # as in the loop: LoRA dropout on
    roots = (tiny_backbone.unet, tiny_backbone.text_encoder, tr.state.network)
    before = [m.training for r in roots for m in r.modules()]
    events: list[dict] = []
    tr.events.on_event = events.append
    tr.make_samples()
    assert [m.training for r in roots for m in r.modules()] == before
    assert [e["kind"] for e in events] == ["phase", "sample"]


def test_out_of_memory_while_sampling_does_not_stop_the_run(tmp_path, tiny_backbone, drawn_dataset, monkeypatch):
    def no_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(sample, "make_samples", no_memory)
    events: list[dict] = []
    res = train(_cfg(tmp_path, drawn_dataset, "oom", sample_images=2), tiny_backbone, on_event=events.append)
    assert res.steps == 4 and res.lora_path.is_file()
    notes = [e["text"] for e in events if e["kind"] == "phase" and "No sample images" in e["text"]]
    assert len(notes) == 2 and "training goes on" in notes[0]
