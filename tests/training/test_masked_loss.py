"""masked_loss: the masks Prepare writes into masks/ (background removal with keep_rgba) weight
the loss per latent pixel, downscaled to latent size by area averaging, as kohya's
apply_masked_loss; an image's own transparency is the fallback; no mask: a warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib_lora.config import PrepareConfig, TrainConfig
from lib_lora.training import data as data_mod
from lib_lora.training.masks import load_masks, mask_file
from lib_lora.training.run import Trainer, predict_with
from lib_lora.training.speed import split_conditioning

TINY_BG_MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_bg_model.onnx"


def _green_screen(path: Path, cx: int) -> None:
    """A red disc (the tiny background model's foreground) on green, off centre."""
    yy, xx = np.mgrid[0:128, 0:128]
    arr = np.zeros((128, 128, 3), np.uint8)
    arr[:] = (40, 200, 40)
    arr[(xx - cx) ** 2 + (yy - 64) ** 2 < 36**2] = (220, 40, 40)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from lib_lora.dataset.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("masked")
    src = root / "src"
    src.mkdir()
    for i, cx in enumerate((44, 84)):
        _green_screen(src / f"p{i}.png", cx)
    cfg = PrepareConfig(name="masked", out=str(root / "w"), size=64, crop="center", remove_bg=str(TINY_BG_MODEL),
                        keep_rgba=True, workers=1, repeats=2)  # fmt: skip
    report = prepare_dataset(src, cfg)
    assert all(r.mask is not None for r in report.items)
    return root / "w" / "masked"


def _cfg(tmp_path: Path, dataset: Path, **kw) -> TrainConfig:
    base = dict(name="mask", dataset=str(dataset), output_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"),
                resolution=64, min_bucket_reso=64, max_bucket_reso=128, dim=4, alpha=4.0, lr="1e-3",
                optimizer="adamw", lr_scheduler="constant", device="cpu", max_steps=2, seed=3, batch_size=2,
                masked_loss=True)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _block_mean(mask_png: Path, k: int = 8) -> torch.Tensor:
    """The mask averaged over k x k blocks (area downscaling, computed without torch)."""
    with Image.open(mask_png) as im:
        a = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    h, w = a.shape
    return torch.from_numpy(a.reshape(h // k, k, w // k, k).mean(axis=(1, 3)))


def test_prepares_masks_weight_the_training_loss(tmp_path, prepared, tiny_backbone):
    events = []
    tr = Trainer(_cfg(tmp_path, prepared), backbone=tiny_backbone, on_event=events.append)
    tr.state.session_id = "test"
    tr.load_all()
    try:
        s = tr.state
        assert any("2 of 2 images have a mask" in e.get("text", "") for e in events)
        for it in s.dataset.items:
            src = mask_file(it.path, s.dataset.root)
            assert src is not None and src.parent == prepared / "masks"
            # The image is its bucket's size (64 px): the mask is only area-downscaled, 8x8 blocks.
            torch.testing.assert_close(s.mask_of[id(it)][0].double(), _block_mean(src), atol=1e-6, rtol=0)
            assert 0.1 < float(s.mask_of[id(it)].mean()) < 0.9  # a subject and a background
        batch = next(iter(data_mod.iter_batches(s.dataset.items, tr.cfg, 1, tr.cfg.seed)))
        d = tr.step_inputs(batch)
        assert d.mask.shape == (2, 1, 8, 8)
        got = float(tr.backward(d))
        # The loss by its formula: squared error times the mask, the mean over every element.
        t = d.timesteps
        noisy = s.sqrt_ac[t].view(-1, 1, 1, 1) * d.latents + s.sqrt_1mac[t].view(-1, 1, 1, 1) * d.noise
        with torch.no_grad():
            cond, pooled = split_conditioning(s.backbone.encode_text(d.ids))
            pred = predict_with(s.backbone.predict_noise, s.backbone, noisy, t, cond, pooled, None)
        masks = torch.stack([s.mask_of[id(it)] for it in batch.items]).double()
        want = float(((pred.double() - d.noise.double()) ** 2 * masks).mean())
        assert got == pytest.approx(want, rel=1e-5)  # fp32 against float64 over 512 elements
        unmasked = float(((pred.double() - d.noise.double()) ** 2).mean())
        assert abs(got - unmasked) > 0.05 * unmasked  # the mask changes the loss
    finally:
        tr.close()


def test_masks_follow_the_bucket_crop_and_fall_back_to_alpha(tmp_path):
    root = tmp_path / "ds"
    sub = root / "3_tok"
    (root / "masks").mkdir(parents=True)
    sub.mkdir()
    # A 128x64 image: its mask is white on the left half (the subject) only.
    Image.new("RGB", (128, 64), (90, 90, 90)).save(sub / "wide.png")
    left = np.zeros((64, 128), np.uint8)
    left[:, :64] = 255
    Image.fromarray(left).save(root / "masks" / "wide.png")
    # An RGBA image without a mask file: its alpha (top half opaque) is the mask.
    rgba = np.full((64, 64, 4), 255, np.uint8)
    rgba[32:, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(sub / "alpha.png")
    # A plain image: no mask at all, counted whole.
    Image.new("RGB", (64, 64), (10, 20, 30)).save(sub / "plain.jpg")
    cfg = _cfg(tmp_path, root, bucket_reso_steps=32)  # the wide image's bucket: 64x32
    ds = data_mod.scan_dataset(root, cfg)
    assert sorted(it.bucket for it in ds.items) == [(64, 32), (64, 64), (64, 64)]
    by = {it.path.stem: it for it in ds.items}
    latent_of = {id(it): torch.zeros(4, it.bucket[1] // 8, it.bucket[0] // 8) for it in ds.items}
    masks = load_masks(ds.items, root, latent_of)
    assert masks.found == 2 and not masks.problems
    wide = masks.of[id(by["wide"])][0]
    assert wide.shape == latent_of[id(by["wide"])].shape[1:]
    assert float(wide[:, 0].min()) > 0.99 and float(wide[:, -1].max()) < 0.01  # left subject, right background
    assert float(wide.mean()) == pytest.approx(0.5, abs=0.05)
    alpha = masks.of[id(by["alpha"])][0]
    torch.testing.assert_close(alpha[:4], torch.ones(4, 8))
    torch.testing.assert_close(alpha[4:], torch.zeros(4, 8))
    assert torch.equal(masks.of[id(by["plain"])], torch.ones(1, 8, 8))


def test_no_mask_anywhere_warns_and_trains_unmasked(tmp_path, drawn_dataset, tiny_backbone):
    events = []
    tr = Trainer(_cfg(tmp_path, drawn_dataset), backbone=tiny_backbone, on_event=events.append)
    tr.state.session_id = "test"
    try:
        tr.load_all(optimizer=False)
        assert tr.state.mask_of is None
    finally:
        tr.close()
    warnings = [e["text"] for e in events if e.get("level") == "warning"]
    assert any("none of the 4 images has a mask" in w and "--keep-rgba" in w for w in warnings), warnings


def test_a_regularisation_image_does_not_take_a_training_images_mask(tmp_path, prepared):
    train_image = next(p for p in sorted(prepared.rglob("*.png")) if p.parent.name != "masks")
    assert mask_file(train_image, prepared) == prepared / "masks" / train_image.name
    reg = tmp_path / "reg" / "1_person"
    reg.mkdir(parents=True)
    (reg / train_image.name).write_bytes(train_image.read_bytes())  # the same file name, another folder
    assert mask_file(reg / train_image.name, prepared) is None
    (reg / "masks").mkdir()
    Image.new("L", (64, 64), 255).save(reg / "masks" / train_image.name)
    assert mask_file(reg / train_image.name, prepared) == reg / "masks" / train_image.name  # its own still counts


def test_a_mask_changed_since_a_stop_refuses_the_resume(tmp_path, prepared, tiny_backbone, one_thread):
    import shutil

    from progress_helpers import StopAt

    from lib_lora.errors import Cancelled
    from lib_lora.training.run import train
    from lib_lora.training.state import ResumeError, state_path

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    cfg = _cfg(tmp_path, data, max_steps=4, batch_size=1)
    with pytest.raises(Cancelled):
        train(cfg, progress=StopAt(1), backbone=tiny_backbone)
    mask = next(iter(sorted((data / "masks").iterdir())))
    original = mask.read_bytes()
    with Image.open(mask) as im:
        flipped = im.convert("L").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped.save(mask)
    with pytest.raises(ResumeError, match="masks"):
        train(cfg, backbone=tiny_backbone)
    mask.write_bytes(original)  # the old mask back: the run resumes and finishes
    path = state_path(cfg.run_dir)
    st = torch.load(path, weights_only=True)
    older = {k: v for k, v in st.items() if k != "data_digest"}  # an earlier version's state: masks not in it
    torch.save(older, path)
    with pytest.raises(ResumeError, match="earlier version, which did not record the masks"):
        train(cfg, backbone=tiny_backbone)
    torch.save(st, path)
    events = []
    assert train(cfg, on_event=events.append, backbone=tiny_backbone).steps == 4
    assert any("Resuming at step 1 of 4" in e.get("text", "") for e in events if e["kind"] == "phase")
