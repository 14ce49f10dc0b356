"""SD1.5 training output against a committed reference: two fixed-seed runs on the tiny model.

The reference LoRA tensors (fp32) are in tests/fixtures/sd15_reference_lora.safetensors, their
sha256 per run and a kernel fingerprint in tests/fixtures/sd15_reference.json. Exact bits are
only meaningful with the same CPU kernels and library versions: where this machine's
fingerprint (one-thread float32 results of the kernels a run uses, and the versions of torch,
diffusers and transformers, whose code decides which kernels run in which order) equals the
recorded one, the sha256 must be equal; elsewhere the tensors must agree within
`relative_tolerance`.

Regenerate (after an intended change of the training output, or of the tiny model):
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tests/training/test_sd15_reference.py --write
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REFERENCE_TENSORS = FIXTURES / "sd15_reference_lora.safetensors"
REFERENCE_JSON = FIXTURES / "sd15_reference.json"
MAX_STEPS = 8

# The recipe: U-Net + TE LoRA with conv, dropout, min-SNR, noise offset, caption shuffle; and a
# frozen-TE run with cached text-encoder outputs and clip skip 2.
RUNS = {
    "full": dict(conv_dim=2, conv_alpha=1.0, network_dropout=0.1, min_snr_gamma=5.0, noise_offset=0.05,
                 shuffle_caption=True, train_text_encoder=True),
    "frozen_te": dict(train_text_encoder=False, cache_text_encoder_outputs=True, clip_skip=2),
}


def make_dataset(root: Path) -> Path:
    sub = root / "5_tok"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, size in enumerate([(64, 64), (96, 64), (64, 96)]):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(sub / f"img{i}.png")
        (sub / f"img{i}.txt").write_text(f"tok, tag{i}, red, blue, green", encoding="utf-8")
    return root


def train_run(tmp: Path, dataset: Path, name: str) -> dict[str, torch.Tensor]:
    from lib_lora.config import TrainConfig
    from lib_lora.training.export import read_lora
    from lib_lora.training.run import train

    cfg = dict(name=name, dataset=str(dataset), base_model="tiny", output_dir=str(tmp / "out"),
               run_dir=str(tmp / "runs" / name), resolution=64, min_bucket_reso=64, max_bucket_reso=128,
               dim=4, alpha=2.0, optimizer="adamw", lr="1e-3", lr_scheduler="cosine", lr_warmup_steps=2,
               max_steps=MAX_STEPS, seed=7, log_every_n_steps=1, device="cpu", save_precision="fp32")
    cfg.update(RUNS[name])
    return read_lora(train(TrainConfig(**cfg)).lora_path)[0]


def train_all() -> dict[str, dict[str, torch.Tensor]]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ds = make_dataset(tmp / "data")
        return {name: train_run(tmp, ds, name) for name in RUNS}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted names and raw bytes (as /work's sd15_ref.py prints it)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def kernel_fingerprint() -> str:
    """sha256 of one-thread float32 results of the kernels a run uses (matmul, linear and conv
    forward and backward, softmax, attention, layer and group norm, SiLU/GELU) on seeded inputs,
    and of the library versions that choose and order those kernels. Call with one thread."""
    import diffusers
    import transformers

    gen = torch.Generator().manual_seed(20240611)

    def rand(*shape):
        return torch.randn(shape, generator=gen)

    f = torch.nn.functional
    h = hashlib.sha256(f"torch {torch.__version__} diffusers {diffusers.__version__} "
                       f"transformers {transformers.__version__}".encode())
    x, w, b = rand(2, 32, 16, 16).requires_grad_(), rand(64, 32, 3, 3).requires_grad_(), rand(64)
    y = f.conv2d(x, w, b, padding=1)
    y.square().sum().backward()
    a, lw = rand(77, 320).requires_grad_(), rand(96, 320).requires_grad_()
    z = f.linear(a, lw, rand(96))
    z.square().sum().backward()
    q, k, v = rand(2, 8, 77, 8), rand(2, 8, 77, 8), rand(2, 8, 77, 8)
    outs = [
        y, x.grad, w.grad, z, a.grad, lw.grad, rand(64, 320) @ rand(320, 96),
        torch.softmax(rand(4, 77, 77), -1), f.scaled_dot_product_attention(q, k, v),
        f.layer_norm(rand(2, 77, 64), (64,)), f.group_norm(rand(2, 64, 16, 16), 32), f.silu(rand(4096)),
        f.gelu(rand(4096)),
    ]
    for t in outs:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def relative_tolerance(rounding: float, steps: int = MAX_STEPS) -> float:
    """How far two correct runs on other kernels may drift apart, as a relative L2 error of
    the trained LoRA tensors (of all up weights together, and of all down weights together).

    `rounding` is the relative error one float32 forward and backward pass carries when its
    sums run in another order (tests/conftest.py `_float32_rounding`: 2 x layers x sqrt(fan-in)
    x 2^-24). AdamW's step m/(sqrt(v)+eps) does not depend on the gradient's scale: a gradient
    off by a relative `rounding` moves a step by at most 2 x `rounding` (the first moment by
    it, the root of the second by half of it, each way). Up weights start at zero, so they are
    the sum of `steps` steps, each within 2 x `rounding`; the steps' rounding errors come from
    different inputs, noise and timesteps, so (as the per-sum estimate assumes) they have random
    signs and add in quadrature: 2 x sqrt(steps) x `rounding`. Down weights are their seeded init
    (drawn the same way on every CPU) plus such steps, so they are closer. The feedback (weights
    that differ give other gradients next step) is left out: over 8 steps of lr 1e-3 the LoRA
    changes the model's output by about 1e-2, so that term is second order."""
    return 2 * steps**0.5 * rounding


def compare(runs: dict[str, dict[str, torch.Tensor]], reference: dict[str, dict[str, torch.Tensor]], tol: float) -> None:
    """Same names, shapes and dtypes; alphas exact; up and down weights within `tol` (relative L2)."""
    assert runs.keys() == reference.keys()
    for name, ref in reference.items():
        got = runs[name]
        assert got.keys() == ref.keys(), f"{name}: {sorted(set(got) ^ set(ref))[:5]}"
        for k, r in ref.items():
            assert got[k].shape == r.shape and got[k].dtype == r.dtype, (name, k)
        alphas = [k for k in ref if k.endswith(".alpha")]
        assert all(torch.equal(got[k], ref[k]) for k in alphas), name
        for part in (".lora_up.", ".lora_down."):
            keys = sorted(k for k in ref if part in k)
            assert keys, (name, part)
            r = torch.cat([ref[k].reshape(-1) for k in keys]).double()
            g = torch.cat([got[k].reshape(-1) for k in keys]).double()
            err = (g - r).norm().item() / r.norm().item()
            assert err <= tol, f"{name}{part}: relative L2 error {err:.3g} > {tol:.3g}"


def _split_runs(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    runs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        name, rest = key.split("/", 1)
        runs.setdefault(name, {})[rest] = t
    return runs


def load_reference() -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    from safetensors.torch import load_file

    return _split_runs(load_file(str(REFERENCE_TENSORS))), json.loads(REFERENCE_JSON.read_text(encoding="utf-8"))


def write_reference() -> dict:
    from safetensors.torch import save_file

    from lib_lora.training.tiny_model import TINY_VERSION

    torch.set_num_threads(1)
    runs = train_all()
    flat = {f"{name}/{k}": t.to(torch.float32).contiguous() for name, ts in runs.items() for k, t in ts.items()}
    FIXTURES.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(REFERENCE_TENSORS))
    record = {
        "sha256": {name: tensors_sha256(ts) for name, ts in runs.items()},
        "kernel_fingerprint": kernel_fingerprint(),
        "tiny_model_version": TINY_VERSION,
        "recorded_with": f"torch {torch.__version__}, one thread",
    }
    REFERENCE_JSON.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


# ---------------------------------------------------------------------------------------------


def test_fixture_tensors_are_the_recorded_ones():
    reference, record = load_reference()
    assert {name: tensors_sha256(ts) for name, ts in reference.items()} == record["sha256"]
    from lib_lora.training.tiny_model import TINY_VERSION

    assert record["tiny_model_version"] == TINY_VERSION, "the tiny model changed: regenerate with --write"


def test_compare_accepts_rounding_drift_and_refuses_a_change(float32_rounding):
    from lib_lora.training.tiny_model import build_sd15_modules

    reference, _ = load_reference()
    unet, _, te = build_sd15_modules(False)
    tol = relative_tolerance(float32_rounding(unet, te))
    gen = torch.Generator().manual_seed(0)

    def scaled_noise(rel):  # a perturbation of relative L2 size `rel` per tensor
        return {n: {k: t if k.endswith(".alpha") else t + rel * t.norm() / t.numel() ** 0.5 * torch.randn(t.shape, generator=gen)
                    for k, t in ts.items()} for n, ts in reference.items()}

    compare(scaled_noise(tol / 4), reference, tol)
    try:
        compare(scaled_noise(4 * tol), reference, tol)
    except AssertionError:
        pass
    else:
        raise AssertionError("a change 4x the tolerance passed the comparison")


def test_sd15_training_matches_the_reference(one_thread, float32_rounding):
    from lib_lora.training.tiny_model import build_sd15_modules

    reference, record = load_reference()
    runs = train_all()
    if kernel_fingerprint() == record["kernel_fingerprint"]:
        assert {name: tensors_sha256(ts) for name, ts in runs.items()} == record["sha256"]
    unet, _, te = build_sd15_modules(False)
    compare(runs, reference, relative_tolerance(float32_rounding(unet, te)))


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {sys.argv[0]} --write   (regenerates {REFERENCE_TENSORS.name} and {REFERENCE_JSON.name})")
    print(json.dumps(write_reference(), indent=2))
