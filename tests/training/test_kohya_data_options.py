"""The data and caption options kohya users expect, as sd-scripts' library/train_util.py applies
them: caption prefix/suffix, keep_tokens_separator, caption and tag dropout, flip_aug (mirrored
latents, SDXL crop conditioning), regularisation images (kohya's repeats, prior_loss_weight) and
several concept folders (subsets). Each test shows the option's effect on a batch or the loss."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from lib_lora.config import TrainConfig, coerce, validate
from lib_lora.errors import DatasetError, UserError
from lib_lora.training import data, speed
from lib_lora.training.metadata import RunInfo, build_metadata
from lib_lora.training.run import Trainer, sample_time_ids

TAGS = "tok, red, blue, green, hat, smile"


def _img(path: Path, size=(64, 64), colour=(120, 60, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _folder(root: Path, name: str, n: int, caption: str | None = TAGS, size=(64, 64)) -> Path:
    for i in range(n):
        _img(root / name / f"{name}_{i}.png", size, (40 * i % 255, 90, 200))
        if caption is not None:
            (root / name / f"{name}_{i}.png").with_suffix(".txt").write_text(caption, encoding="utf-8")
    return root / name


def _cfg(**kw) -> TrainConfig:
    base = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, batch_size=1)
    base.update(kw)
    return validate(TrainConfig(**base))


def _captions(ds: data.Dataset, cfg: TrainConfig, epoch: int = 0, seed: int = 5) -> list[str]:
    return [c for b in data.epoch_batches(ds.items, cfg, epoch, seed) for c in b.captions]


# ---- (a) captions ----------------------------------------------------------------------------


def test_prefix_and_suffix_wrap_every_caption_and_count_for_keep_tokens():
    s = data.CaptionSettings(caption_prefix="masterpiece", caption_suffix="best quality", keep_tokens=1,
                             shuffle_caption=True)
    out = {data.process_caption("tok, a, b, c", s, 0, random.Random(i)) for i in range(40)}
    # kohya joins with a space, before keep_tokens counts: "masterpiece tok" is the kept first tag.
    assert all(o.startswith("masterpiece tok, ") for o in out)
    assert {o.split(", ")[-1] for o in out} >= {"c best quality"} and len(out) > 1
    # Not shuffled: just the text around the caption.
    plain = data.CaptionSettings(caption_prefix="pre", caption_suffix="post")
    assert data.process_caption("a, b", plain, 0, random.Random(0)) == "pre a, b post"


def test_keep_tokens_separator_keeps_head_and_tail_and_is_taken_out():
    s = data.CaptionSettings(keep_tokens_separator="|||", shuffle_caption=True, keep_tokens=0)
    cap = "anna, 1girl ||| red, blue, green, hat ||| photo, sharp"
    outs = {data.process_caption(cap, s, 0, random.Random(i)) for i in range(60)}
    for o in outs:
        tags = o.split(", ")
        assert tags[:2] == ["anna", "1girl"] and tags[-2:] == ["photo", "sharp"]
        assert sorted(tags[2:-2]) == ["blue", "green", "hat", "red"] and "|||" not in o
    assert len(outs) > 1  # the middle was shuffled
    # Neither shuffled nor tag-dropped: the separator still goes (kohya would leave "|||" in).
    fixed = data.CaptionSettings(keep_tokens_separator="|||")
    assert data.process_caption(cap, fixed, 0, random.Random(0)) == "anna, 1girl, red, blue, green, hat, photo, sharp"


def test_tag_dropout_drops_only_unkept_tags_at_its_rate():
    s = data.CaptionSettings(keep_tokens=1, caption_tag_dropout_rate=0.3)
    rng = random.Random(11)
    n, dropped = 3000, 0
    for _ in range(n):
        tags = data.process_caption(TAGS, s, 0, rng).split(", ")
        assert tags[0] == "tok"  # kept
        assert tags[1:] == [t for t in TAGS.split(", ")[1:] if t in tags[1:]]  # order kept (no shuffle)
        dropped += 5 - (len(tags) - 1)
    # Binomial(15000, 0.3): sd = sqrt(15000 * 0.3 * 0.7) ~ 56; 6 sd either side.
    assert abs(dropped - 0.3 * 5 * n) < 6 * (5 * n * 0.3 * 0.7) ** 0.5
    assert data.process_caption(TAGS, dataclasses.replace(s, caption_tag_dropout_rate=1.0), 0, rng) == "tok"


def test_caption_dropout_rate_and_every_n_epochs_in_the_epoch(tmp_path):
    _folder(tmp_path, "20_tok", 5)
    cfg = _cfg(caption_dropout_rate=0.25)
    ds = data.scan_dataset(tmp_path, cfg)
    caps = [c for e in range(8) for c in _captions(ds, cfg, e)]
    empty = caps.count("")
    assert set(caps) == {"", TAGS}
    n = len(caps)  # 800 draws; Binomial(800, 0.25): sd ~ 12.2
    assert abs(empty - 0.25 * n) < 6 * (n * 0.25 * 0.75) ** 0.5
    # Every 2nd epoch (kohya counts from 1): epochs 2 and 4 have no captions, 1 and 3 all of them.
    cfg2 = _cfg(caption_dropout_every_n_epochs=2)
    ds2 = data.scan_dataset(tmp_path, cfg2)  # the settings are the subsets', fixed when the data is read
    per_epoch = [set(_captions(ds2, cfg2, e)) for e in range(4)]
    assert per_epoch == [{TAGS}, {""}, {TAGS}, {""}]


def test_caption_options_are_deterministic_and_resume_exactly(tmp_path):
    _folder(tmp_path, "3_tok", 4)
    cfg = _cfg(shuffle_caption=True, caption_dropout_rate=0.2, caption_tag_dropout_rate=0.2, flip_aug=True,
               caption_prefix="p")
    ds = data.scan_dataset(tmp_path, cfg)
    full = list(data.iter_batches(ds.items, cfg, 30, seed=9))
    again = list(data.iter_batches(ds.items, cfg, 30, seed=9))
    resumed = list(data.iter_batches(ds.items, cfg, 30, seed=9, start_step=17))
    key = [(b.captions, b.flips, [it.path for it in b.items]) for b in full]
    assert key == [(b.captions, b.flips, [it.path for it in b.items]) for b in again]
    assert key[17:] == [(b.captions, b.flips, [it.path for it in b.items]) for b in resumed]
    other = [b.captions for b in data.iter_batches(ds.items, cfg, 30, seed=10)]
    assert other != [k[0] for k in key]


def test_options_off_draw_nothing_more(tmp_path):
    # With every new option off, the epoch's generator is used exactly as before they existed:
    # the order and shuffles are those of shuffle_caption alone.
    _folder(tmp_path, "4_tok", 3)
    cfg = _cfg(shuffle_caption=True, keep_tokens=1)
    ds = data.scan_dataset(tmp_path, cfg)
    rng = random.Random("5-0")
    pool = [it for it in ds.items for _ in range(it.repeats)]
    rng.shuffle(pool)
    caps = []
    for it in pool:  # the shuffle as it was: the tags after the first, shuffled in place
        tags = [t.strip() for t in it.caption.split(",")]
        tail = tags[1:]
        rng.shuffle(tail)
        caps.append(", ".join(tags[:1] + tail))
    order = list(range(len(pool)))
    rng.shuffle(order)  # then the batches (one per draw here) are shuffled
    got = data.epoch_batches(ds.items, cfg, 0, 5)
    assert [b.captions[0] for b in got] == [caps[i] for i in order]
    assert [b.items[0].path for b in got] == [pool[i].path for i in order]
    assert all(b.flips == [] for b in got)


def test_text_encoder_cache_kept_under_caption_dropout_bypassed_under_tag_dropout(tmp_path, drawn_dataset,
                                                                                   tiny_backbone):
    def feeder_of(**kw):
        cfg = TrainConfig(name="te_cache", dataset=str(drawn_dataset), output_dir=str(tmp_path / "out"),
                          run_dir=str(tmp_path / "run"), resolution=64, dim=4, alpha=4.0, lr="1e-3",
                          optimizer="adamw", device="cpu", max_steps=2, train_text_encoder=False, **kw)
        tr = Trainer(cfg, backbone=tiny_backbone)
        tr.state.session_id = "t"
        tr.load_all()
        try:
            batch = next(data.iter_batches(tr.state.dataset.items, cfg, 2, cfg.seed))
            tr.step_inputs(batch)
            if cfg.flip_aug:  # the run caches the mirrored latents and feeds them
                assert tr.state.feeder.flipped_of.keys() == tr.state.feeder.latent_of.keys() != set()
            return tr.state.feeder.encode_chunks is not None, tr.state.tokens.shuffled
        finally:
            tr.close()

    assert feeder_of(caption_dropout_rate=0.5) == (True, False)  # "" is one more cached caption
    assert feeder_of(caption_tag_dropout_rate=0.5) == (False, True)
    assert feeder_of(flip_aug=True) == (True, False)


# ---- (b) flip_aug ----------------------------------------------------------------------------


def test_flip_aug_caches_the_mirror_latent_and_feeds_it_half_the_time(tmp_path, tiny_backbone):
    # An image whose left and right halves differ, so its mirror is another image.
    img = Image.new("RGB", (64, 64), (250, 250, 250))
    img.paste((10, 10, 200), (0, 0, 24, 64))
    (tmp_path / "2_tok").mkdir()
    img.save(tmp_path / "2_tok" / "a.png")
    cfg = _cfg(flip_aug=True)
    ds = data.scan_dataset(tmp_path, cfg)
    vae = data.vae_identity(tiny_backbone)
    lat = data.cache_latents(ds.items, tiny_backbone, None, vae_id=vae)
    it = ds.items[0]
    plain, mirrored = lat[data.latent_key(it, vae)], lat[data.latent_key(it, vae, flipped=True)]
    assert len(lat) == 2 and not torch.equal(plain, mirrored)
    # The mirrored latent is the VAE's latent of the mirrored pixels (seeded by its own key).
    pixels = data.to_pixels(data.fit_to_bucket(Image.open(it.path).convert("RGB"), it.bucket)).flip(-1)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(int(data.latent_key(it, vae, flipped=True)[:15], 16))
        want = tiny_backbone.encode_images(pixels.unsqueeze(0))[0].float()
    assert torch.equal(mirrored, want)
    # Without flip_aug only the plain latent is made, under the key it always had.
    assert set(data.cache_latents(data.scan_dataset(tmp_path, _cfg()).items, tiny_backbone, None, vae_id=vae)) \
        == {data.latent_key(it, vae)}
    # The feeder gives the mirrored latent to the draws flip_aug tossed heads for.
    feeder = speed.StepFeeder({id(it): plain}, _Tokens(), torch.device("cpu"), torch.Generator().manual_seed(0),
                              1000, flipped_of={id(it): mirrored})
    flips = [f for e in range(20) for b in data.epoch_batches(ds.items, cfg, e, 1) for f in (b.flips or [False])]
    assert 10 < sum(flips) < 30  # 40 draws at 1/2: sd ~ 3.2
    for e in range(3):
        for b in data.epoch_batches(ds.items, cfg, e, 1):
            got = feeder(b).latents[0]
            assert torch.equal(got, mirrored if b.flipped(0) else plain)


class _Tokens:
    """Token ids for the feeder: empty captions as one 77-id chunk (the test looks at latents)."""

    chunk_length = 77

    def batch(self, captions):
        return torch.zeros((len(captions), 77), dtype=torch.long)


def test_sdxl_crop_left_of_a_mirrored_sample_is_measured_from_the_right():
    # kohya: crop_ltrb of a 503x400 image in a 512x384 bucket: resized 482.88 wide, left
    # (512 - 482.88) // 2 = 14; mirrored: left = 512 - right = 512 - 496.88 = 15.12 -> 15.
    it = data.Item(Path("a.png"), "", 1, "s", (503, 400), bucket=(512, 384))
    plain, flipped = sample_time_ids([it, it], [False, True])
    assert plain.tolist() == [400, 503, 0, 14, 384, 512]
    assert flipped.tolist() == [400, 503, 0, 15, 384, 512]


# ---- (c) regularisation images ---------------------------------------------------------------


def test_reg_images_are_repeated_to_match_the_training_images(tmp_path):
    _folder(tmp_path / "train", "10_anna", 2)  # 20 per epoch
    _folder(tmp_path / "reg", "1_woman", 3, caption=None)
    cfg = _cfg(reg_data_dir=str(tmp_path / "reg"))
    ds = data.scan_dataset(tmp_path / "train", cfg)
    reg = [it for it in ds.items if it.is_reg]
    # kohya: each reg image taken once (3), then one more repeat each in turn until 20: 7, 7, 6.
    assert [it.repeats for it in reg] == [7, 7, 6]
    assert all(it.caption == "woman" for it in reg)  # the class tokens of its folder
    p = ds.plan
    assert (p.images, p.images_with_repeats, p.reg_images, p.reg_images_with_repeats) == (2, 20, 3, 20)
    assert p.steps_per_epoch == 40  # reg images are trained too, in the same buckets
    assert p.subsets[-1] == {"folder": "1_woman", "repeats": 1, "images": 3, "is_reg": True}
    # More reg repeats than needed: the images past the training count are left out, as kohya does.
    _folder(tmp_path / "reg2", "5_woman", 6, caption=None)
    ds2 = data.scan_dataset(tmp_path / "train", _cfg(reg_data_dir=str(tmp_path / "reg2")))
    assert [it.repeats for it in ds2.items if it.is_reg] == [5, 5, 5, 5]
    with pytest.raises(DatasetError, match="regularisation folder"):
        data.scan_dataset(tmp_path / "train", _cfg(reg_data_dir=str(tmp_path / "nowhere")))


def test_reg_items_loss_is_weighted_by_prior_loss_weight(tmp_path, tiny_backbone):
    _folder(tmp_path / "train", "1_anna", 1)
    _folder(tmp_path / "reg", "1_woman", 1, caption=None)

    def losses(weight: float):
        cfg = TrainConfig(name="reg", dataset=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"),
                          prior_loss_weight=weight, output_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"),
                          resolution=64, dim=4, alpha=4.0, lr="1e-3", optimizer="adamw", device="cpu",
                          batch_size=2, max_steps=1)
        tr = Trainer(cfg, backbone=tiny_backbone)
        tr.state.session_id = "t"
        tr.load_all()
        try:
            batch = next(data.iter_batches(tr.state.dataset.items, cfg, 1, cfg.seed))
            assert sorted(it.is_reg for it in batch.items) == [False, True]
            d = tr.step_inputs(batch)
            reg = [it.is_reg for it in batch.items]
            out = {}
            for name, w in (("weighted", d.loss_weights),
                            ("train", torch.tensor([0.0 if r else 1.0 for r in reg])),
                            ("reg", torch.tensor([1.0 if r else 0.0 for r in reg]))):
                out[name] = tr.backward(dataclasses.replace(d, loss_weights=w)).item()
                tr.state.optimizer.zero_grad(set_to_none=True)
            return out, d.loss_weights, reg
        finally:
            tr.close()

    out, weights, reg = losses(0.3)
    assert weights.tolist() == pytest.approx([0.3 if r else 1.0 for r in reg])
    # kohya: per-sample loss x (prior_loss_weight for reg, 1 else), then the batch mean.
    assert out["weighted"] == pytest.approx(out["train"] + 0.3 * out["reg"], rel=1e-6)
    assert out["reg"] > 0
    _, weights1, _ = losses(1.0)
    assert weights1 is None  # weight 1: no weighting at all (the loss of a run without reg images)


def test_metadata_keys_for_the_data_options(tmp_path):
    _folder(tmp_path / "train", "10_anna", 2)
    _folder(tmp_path / "reg", "1_woman", 3, caption=None)
    cfg = _cfg(name="md", reg_data_dir=str(tmp_path / "reg"), prior_loss_weight=0.5, caption_dropout_rate=0.1,
               caption_dropout_every_n_epochs=3, caption_tag_dropout_rate=0.2, flip_aug=True, keep_tokens=2)
    plan = data.scan_dataset(tmp_path / "train", cfg).plan
    run = RunInfo(started_at=1.0, unet_lr=1e-4, text_encoder_lr=1e-5, optimizer="AdamW", optimizer_args="",
                  mixed_precision="no", model_name="m", model_hash="", session_id="1")
    md = build_metadata(cfg, plan, run)
    assert (md["ss_caption_dropout_rate"], md["ss_caption_dropout_every_n_epochs"],
            md["ss_caption_tag_dropout_rate"]) == ("0.1", "3", "0.2")
    assert (md["ss_flip_aug"], md["ss_keep_tokens"], md["ss_prior_loss_weight"]) == ("True", "2", "0.5")
    assert md["ss_num_train_images"] == "20" and md["ss_num_reg_images"] == "3"
    assert json.loads(md["ss_dataset_dirs"]) == {"10_anna": {"n_repeats": 10, "img_count": 2}}
    assert json.loads(md["ss_reg_dataset_dirs"]) == {"1_woman": {"n_repeats": 1, "img_count": 3}}
    assert md["ss_num_batches_per_epoch"] == "40"
    plain = build_metadata(_cfg(name="md"), data.scan_dataset(tmp_path / "train", _cfg()).plan, run)
    assert plain["ss_num_reg_images"] == "0" and json.loads(plain["ss_reg_dataset_dirs"]) == {}
    assert plain["ss_flip_aug"] == "False" and plain["ss_prior_loss_weight"] == "1.0"


# ---- (d) subsets -----------------------------------------------------------------------------


def test_subsets_each_with_own_repeats_and_caption_settings(tmp_path):
    a = _folder(tmp_path, "anna", 2, caption="anna, red, blue")
    b = _folder(tmp_path, "5_style", 1, caption="painted, oil, dark")
    cfg = _cfg(subsets=[{"image_dir": str(a), "repeats": 3, "caption_prefix": "photo of"},
                        {"image_dir": str(b), "shuffle_caption": True, "keep_tokens": 0, "flip_aug": True}],
               repeats=7)
    ds = data.scan_dataset(a, cfg)
    by = {it.subset: it for it in ds.items}
    # anna: its own repeats; 5_style: the number in its folder name (the 10_name convention).
    assert (by["anna"].repeats, by["5_style"].repeats) == (3, 5)
    assert ds.plan.images_with_repeats == 2 * 3 + 5
    caps = {it.subset: set() for it in ds.items}
    flips = {it.subset: 0 for it in ds.items}
    for e in range(6):
        for bt in data.epoch_batches(ds.items, cfg, e, 2):
            for i, it in enumerate(bt.items):
                caps[it.subset].add(bt.captions[i])
                flips[it.subset] += bt.flipped(i)
    assert caps["anna"] == {"photo of anna, red, blue"}  # prefixed, never shuffled
    assert len(caps["5_style"]) > 1 and all(c.count(", ") == 2 for c in caps["5_style"])
    assert flips["anna"] == 0 and flips["5_style"] > 0
    # A reg subset counts as regularisation images.
    r = _folder(tmp_path, "woman", 2, caption=None)
    cfg2 = _cfg(subsets=[{"image_dir": str(a), "repeats": 2}, {"image_dir": str(r), "is_reg": True,
                                                             "class_tokens": "woman"}])
    ds2 = data.scan_dataset(a, cfg2)
    assert sorted((it.is_reg, it.repeats, it.caption) for it in ds2.items if it.is_reg) == \
        [(True, 2, "woman"), (True, 2, "woman")]


def test_subsets_from_the_cli_and_bad_entries(tmp_path):
    value = coerce(TrainConfig, "subsets", ['{"image_dir": "a", "repeats": "4"}', '[{"image_dir": "b"}]'])
    cfg = validate(TrainConfig(subsets=value))
    assert cfg.subsets == [{"image_dir": "a", "repeats": 4}, {"image_dir": "b"}]
    with pytest.raises(UserError, match="unknown key"):
        validate(TrainConfig(subsets=[{"image_dir": "a", "num_repeat": 3}]))
    with pytest.raises(UserError, match="no image_dir"):
        validate(TrainConfig(subsets=[{"repeats": 3}]))
    with pytest.raises(UserError, match="subsets entry 1: repeats = 0 is below"):
        validate(TrainConfig(subsets=[{"image_dir": "a", "repeats": 0}]))
    with pytest.raises(UserError, match="not JSON"):
        coerce(TrainConfig, "subsets", "{image_dir: a}")


def test_a_state_saved_before_these_options_existed_still_resumes():
    # A state written by a version without these fields trained with their defaults.
    from lib_lora.training.state import _config_diff, fingerprint

    cfg = TrainConfig(name="x")
    saved = {k: v for k, v in fingerprint(cfg).items()
             if k not in ("caption_dropout_rate", "flip_aug", "subsets", "reg_data_dir", "prior_loss_weight")}
    assert _config_diff(json.dumps(saved), fingerprint(cfg)) == []
    assert _config_diff(json.dumps(saved), fingerprint(dataclasses.replace(cfg, flip_aug=True))) == ["flip_aug"]


def test_a_run_with_every_data_option_trains_and_records_them(tmp_path, tiny_backbone):
    from lib_lora.training.export import read_lora
    from lib_lora.training.run import train

    a = _folder(tmp_path, "anna", 2, caption="anna ||| red, blue, hat")
    b = _folder(tmp_path, "3_style", 1, caption="painted, oil")
    _folder(tmp_path / "reg", "1_woman", 2, caption=None)
    cfg = TrainConfig(name="all_opts", dataset=str(a), output_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"),
                      resolution=64, dim=4, alpha=4.0, lr="1e-3", optimizer="adamw", device="cpu", max_steps=3,
                      subsets=[{"image_dir": str(a), "repeats": 2, "keep_tokens_separator": "|||",
                                "caption_tag_dropout_rate": 0.5},
                               {"image_dir": str(b), "flip_aug": True, "caption_prefix": "art"}],
                      reg_data_dir=str(tmp_path / "reg"), prior_loss_weight=0.5, caption_dropout_rate=0.1,
                      train_text_encoder=False)
    res = train(validate(cfg), backbone=tiny_backbone)
    md = read_lora(res.lora_path)[1]
    assert md["ss_num_train_images"] == "7" and md["ss_num_reg_images"] == "2"
    assert json.loads(md["ss_dataset_dirs"]) == {"anna": {"n_repeats": 2, "img_count": 2},
                                                 "3_style": {"n_repeats": 3, "img_count": 1}}
    assert json.loads(md["ss_reg_dataset_dirs"]) == {"1_woman": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(md["fastlora_config"])["subsets"][1]["flip_aug"] is True


def test_no_dataset_folder_and_no_subsets_never_scans_the_current_folder(tmp_path, monkeypatch):
    from lib_lora.errors import DatasetError
    from lib_lora.training.data import plan_steps

    Image.new("RGB", (64, 64)).save(tmp_path / "here.png")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="No dataset folder given"):
        plan_steps("", TrainConfig(name="x", dataset="", resolution=64))
