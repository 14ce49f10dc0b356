"""The model family object (training/family.py): its facts, and that the modules which used to
hold SD1.5 constants of their own now read them from the family (naming, chunking, text
encoding, schedule, metadata, presets, the LoRA-file refusal)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lib_lora import config
from lib_lora.errors import ModelLoadError, UserError
from lib_lora.training import data, family, schedule, speed
from lib_lora.training.backbone import DiffusersBackbone, encode_text_chunks
from lib_lora.training.family import SD15, SDXL, NoiseSchedule, TextEncoderSpec, family_by_name


def test_kohya_values_of_both_families():
    # kohya-ss/sd-scripts: networks/lora.py prefixes, library/sai_model_spec.py and
    # library/sdxl_model_util.py version strings, the models' VAE scale factors.
    assert (SD15.unet_prefix, SD15.text_encoder_prefixes) == ("lora_unet", ("lora_te",))
    assert (SDXL.unet_prefix, SDXL.text_encoder_prefixes) == ("lora_unet", ("lora_te1", "lora_te2"))
    assert (SD15.base_model_version, SD15.modelspec_architecture) == ("sd_v1", "stable-diffusion-v1/lora")
    assert (SDXL.base_model_version, SDXL.modelspec_architecture) == ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora")
    assert (SD15.latent_scale, SDXL.latent_scale) == (0.18215, 0.13025)
    assert [te.hidden_size for te in SDXL.text_encoders] == [768, 1280]
    assert SDXL.pooled_text_encoder is SDXL.text_encoders[1] and SD15.pooled_text_encoder is None
    assert SDXL.extra_conditioning and not SD15.extra_conditioning


def test_sd15_family_matches_the_shipped_model_configs_and_the_schema_defaults():
    """The family's schedule is the one in SD1.5's scheduler config; its VAE scale the VAE config's;
    its resolution and bucket range the TrainConfig defaults (SD1.5 runs unchanged)."""
    from lib_lora.training.models import sd15_scheduler_config, sd15_vae_config

    sched = sd15_scheduler_config()
    s = SD15.schedule
    assert (s.num_train_timesteps, s.beta_start, s.beta_end, s.beta_schedule, s.prediction_type, s.steps_offset) == (
        sched["num_train_timesteps"], sched["beta_start"], sched["beta_end"], sched["beta_schedule"],
        sched["prediction_type"], sched["steps_offset"])  # fmt: skip
    assert SD15.latent_scale == sd15_vae_config()["scaling_factor"]
    cfg = config.TrainConfig()
    assert SD15.bucket_defaults() == {"resolution": 512, "min_bucket_reso": 256, "max_bucket_reso": 1024} == {
        "resolution": cfg.resolution, "min_bucket_reso": cfg.min_bucket_reso, "max_bucket_reso": cfg.max_bucket_reso}


def test_family_by_name_and_a_clear_refusal():
    assert family_by_name("sd15") is SD15 and family_by_name("SD1.5") is SD15 and family_by_name("SDXL") is SDXL
    with pytest.raises(UserError, match="Unknown model family 'flux'; choose one of sd15, sdxl"):
        family_by_name("flux")


def test_families_are_frozen_and_their_presets_read_only():
    with pytest.raises(AttributeError):
        SD15.chunk_length = 10  # type: ignore[misc]
    with pytest.raises(TypeError):
        SD15.presets["person"]["dim"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        SD15.presets["new"] = {}  # type: ignore[index]


def test_hidden_layer_follows_clip_skip_only_where_the_family_says():
    sd, xl1, xl2 = SD15.text_encoders[0], *SDXL.text_encoders
    assert [sd.hidden_layer(n) for n in (1, 2, 3)] == [1, 2, 3]
    assert [xl1.hidden_layer(n) for n in (1, 2, 3)] == [2, 2, 2] == [xl2.hidden_layer(n) for n in (1, 2, 3)]


# ---------------------------------------------------------------------------- presets


def test_presets_come_from_the_family():
    assert config.PRESETS is SD15.presets
    sd = config.apply_preset(config.TrainConfig(), "person")
    assert (sd.dim, sd.train_text_encoder, sd.resolution) == (128, True, 512)
    xl = config.apply_preset(config.TrainConfig(), "person", SDXL)  # validates
    assert (xl.train_text_encoder, xl.train_unet, xl.resolution) == (False, True, 1024)
    assert (xl.min_bucket_reso, xl.max_bucket_reso) == SDXL.bucket_range
    assert set(SDXL.presets) == set(SD15.presets)
    with pytest.raises(UserError, match="Unknown preset"):
        config.apply_preset(config.TrainConfig(), "anime", SDXL)


# ---------------------------------------------------------------------------- naming


def _renamed(bb):
    fake = SD15.replace(unet_prefix="lora_x", text_encoders=(TextEncoderSpec("lora_te9", 768),))
    return DiffusersBackbone(bb.unet, bb.vae, bb.text_encoder, bb.tokenizer, bb.scheduler, family=fake)


def test_lora_names_use_the_backbones_family_prefixes(tiny_backbone):
    names = [t.name for t in tiny_backbone.lora_targets()]
    assert {n.split("_")[1] for n in names} == {"unet", "te"}
    renamed = [t.name for t in _renamed(tiny_backbone).lora_targets()]
    assert renamed == [n.replace("lora_unet_", "lora_x_").replace("lora_te_", "lora_te9_") for n in names]


def test_text_encoder_parameters_are_every_non_unet_lora(tiny_backbone):
    from lib_lora.training.lora import LoRANetwork
    from lib_lora.training.naming import Target

    targets = tiny_backbone.lora_targets()
    te = [t for t in targets if t.name.startswith("lora_te_")]
    # An SDXL-style network: the text-encoder LoRAs under lora_te1/lora_te2 are text-encoder parameters.
    split = [Target(t.name.replace("lora_te_", "lora_te1_" if i % 2 else "lora_te2_"), t.module, t.conv3x3)
             for i, t in enumerate(te)]  # fmt: skip
    net = LoRANetwork([t for t in targets if t not in te] + split, dim=2, alpha=1.0)
    assert len(net.te_parameters()) == 2 * len(te)  # down + up per module
    assert len(net.unet_parameters()) + len(net.te_parameters()) == len(list(net.parameters()))


def test_a_lora_of_any_family_is_refused_as_a_base_model():
    from lib_lora.training.models import check_sd15

    for prefix in family.all_lora_prefixes():
        sd = {f"{prefix}_some_module.lora_down.weight": torch.zeros(1, 1)}
        with pytest.raises(ModelLoadError, match="is a LoRA, not a base model"):
            check_sd15(sd, "x.safetensors")


# ---------------------------------------------------------------------------- chunking


class _Tokenizer:
    """Word -> id; BOS 1, EOS 2, pad 3 (enough for CaptionTokens)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

    def __call__(self, text, **_kw):
        return SimpleNamespace(input_ids=[10 + len(w) for w in text.split()])


def test_caption_chunks_follow_the_family():
    small = SD15.replace(chunk_length=6, max_chunks=2)  # 4 tokens a chunk, 8 at most
    tok = data.CaptionTokens(_Tokenizer(), family=small)
    ids = tok.batch(["a bb ccc dddd e", "a"])
    assert ids.tolist() == [[1, 11, 12, 13, 14, 2, 1, 11, 2, 3, 3, 3],
                            [1, 11, 2, 3, 3, 3, 1, 2, 3, 3, 3, 3]]  # fmt: skip
    tok.batch(["a " * 9])
    assert tok.truncated == {"a " * 9} and tok.max_tokens == 8
    # SD1.5: 77-id chunks, 225 tokens at most.
    sd = data.CaptionTokens(_Tokenizer())
    assert sd.batch(["a"]).shape == (1, 77) and sd.max_tokens == 225


def test_an_encoders_own_pad_id_wins_over_the_tokenizers():
    padded_zero = SD15.replace(text_encoders=(TextEncoderSpec("lora_te", 768, pad_token_id=0),))
    assert data.CaptionTokens(_Tokenizer(), family=padded_zero).batch(["a"]).tolist()[0][3:6] == [0, 0, 0]
    assert data.CaptionTokens(_Tokenizer()).batch(["a"]).tolist()[0][3:6] == [3, 3, 3]


def test_step_feeder_pads_and_keys_captions_by_the_familys_chunk():
    """Two fixed captions of different lengths in one batch: the shorter gets empty chunks of the
    family's length, and each cache key is one chunk (as CaptionTokens.batch makes them)."""
    small = SD15.replace(chunk_length=6, max_chunks=3)
    tok = data.CaptionTokens(_Tokenizer(), family=small)
    items = [SimpleNamespace(), SimpleNamespace()]
    latent_of = {id(it): torch.zeros(4, 2, 2) for it in items}
    feeder = speed.StepFeeder(latent_of, tok, torch.device("cpu"), torch.Generator().manual_seed(0), 1000,
                              encode_chunks=lambda ids: torch.zeros(ids.shape[0], ids.shape[1], 3))  # fmt: skip
    batch = SimpleNamespace(items=items, captions=["a bb ccc dddd e f", "a"])
    step = feeder(batch)
    assert torch.equal(step.ids, tok.batch(batch.captions)) and step.ids.shape == (2, 12)
    assert step.cond.shape == (2, 12, 3)


# ---------------------------------------------------------------------------- text encoding


def test_text_is_encoded_in_the_familys_chunks_and_hidden_state(tiny_backbone):
    te = tiny_backbone.text_encoder
    ids = torch.randint(3, 50, (2, 20), generator=torch.Generator().manual_seed(0))
    ten = SD15.replace(chunk_length=10)
    with torch.no_grad():
        got = encode_text_chunks(te, ids, 1, family=ten)
        halves = torch.cat([te(ids[:, :10]).last_hidden_state, te(ids[:, 10:]).last_hidden_state], dim=1)
        assert torch.equal(got, halves)
        assert not torch.equal(encode_text_chunks(te, ids, 1, family=SD15), halves)  # one 20-id chunk
        # SD1.5: clip_skip 2 = the penultimate state through the final layer norm.
        out = te(ids, output_hidden_states=True)
        skip2 = encode_text_chunks(te, ids, 2, family=SD15)
        assert torch.equal(skip2, te.text_model.final_layer_norm(out.hidden_states[-2]))
        # SDXL's encoders: the penultimate state as it is, whatever clip_skip says.
        for n in (1, 3):
            assert torch.equal(encode_text_chunks(te, ids, n, family=SDXL, encoder=0), out.hidden_states[-2])


# ---------------------------------------------------------------------------- schedule


def test_noise_schedule_and_samplers_read_the_family():
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    from lib_lora.training.models import sd15_scheduler_config

    ref = DDPMScheduler.from_config(sd15_scheduler_config()).alphas_cumprod
    assert torch.equal(schedule.noise_schedule(SD15), ref.float())
    steeper = SD15.replace(schedule=NoiseSchedule(beta_end=0.02, num_train_timesteps=500))
    ac = schedule.noise_schedule(steeper)
    expected = DDPMScheduler(num_train_timesteps=500, beta_start=0.00085, beta_end=0.02, beta_schedule="scaled_linear")
    assert torch.equal(ac, expected.alphas_cumprod.float())
    euler = schedule.family_scheduler(EulerDiscreteScheduler, steeper)
    assert (euler.config.beta_end, euler.config.num_train_timesteps, euler.config.steps_offset) == (0.02, 500, 1)
    assert schedule.ddim(4, steeper).timesteps.max() < 500


def test_denoise_uses_the_familys_schedule(tiny_backbone):
    from lib_lora.training import sample

    bb = tiny_backbone
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    cond = torch.zeros(1, 77, bb.text_encoder.config.hidden_size)
    steeper = SD15.replace(schedule=NoiseSchedule(beta_end=0.02))
    a = sample.denoise(bb.predict_noise, cond, cond, noise, 3, 1.0)
    b = sample.denoise(bb.predict_noise, cond, cond, noise, 3, 1.0, family=steeper)
    assert torch.equal(a, sample.denoise(bb.predict_noise, cond, cond, noise, 3, 1.0, family=SD15))
    assert not torch.equal(a, b)


# ---------------------------------------------------------------------------- metadata


def test_metadata_values_are_the_familys(drawn_dataset):
    from lib_lora.training.metadata import REQUIRED_KEYS, RunInfo, build_metadata

    cfg = config.TrainConfig(name="x", dataset=str(drawn_dataset))
    plan = data.plan_steps(drawn_dataset, cfg)
    run = RunInfo(started_at=0.0, unet_lr=1e-4, text_encoder_lr=1e-5, optimizer="AdamW", optimizer_args="",
                  mixed_precision="no", model_name="m", model_hash="", session_id="s")  # fmt: skip
    sd = build_metadata(cfg, plan, run)
    assert (sd["ss_base_model_version"], sd["modelspec.architecture"], sd["modelspec.prediction_type"]) == (
        "sd_v1", "stable-diffusion-v1/lora", "epsilon")
    assert build_metadata(cfg, plan, run, SD15) == sd
    xl = build_metadata(cfg, plan, run, SDXL)
    assert (xl["ss_base_model_version"], xl["modelspec.architecture"]) == ("sdxl_base_v1-0",
                                                                         "stable-diffusion-xl-v1-base/lora")
    assert all(k in xl for k in REQUIRED_KEYS)
    assert json.loads(xl["fastlora_config"])["name"] == "x"
