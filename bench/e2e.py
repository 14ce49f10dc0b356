"""The tutorial's job end to end, wall time per phase.

35 photos -> prepare -> tag -> train (load, cache latents, LR probe, 1050 sample-steps at batch
1, save the LoRA). Prepare and tag run when this build has them (lib_lora.dataset /
lib_lora.tagging) and can run them offline; otherwise the row says why it was skipped and the
training reads the synthetic photos with their synthetic captions directly.

    python bench/e2e.py                         # CUDA if present: a full-size SD1.5 file via --base-model
    python bench/e2e.py --cpu                   # CPU: the tiny built-in model, 256², 1050 steps
    python bench/e2e.py --cpu --steps 200 --json e2e.json
    python bench/e2e.py --base-model sd15-random   # CUDA, full-size SD1.5 with random weights (no file)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import bench_common  # noqa: F401
import torch
from bench_common import make_dataset, sd15_random_backbone, table


class Phases:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def run(self, name: str, fn, *a, **kw):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            out = fn(*a, **kw)
            note = ""
        except Exception as err:  # noqa: BLE001 - a bench reports and goes on
            out, note = None, f"skipped: {type(err).__name__}: {str(err).splitlines()[0][:90] if str(err) else ''}"
        self.rows.append({"phase": name, "seconds": round(time.perf_counter() - t0, 2),
                          "cpu_s": round(time.process_time() - c0, 2), "note": note})  # fmt: skip
        print(json.dumps(self.rows[-1]), flush=True)
        return out


def prepare(photos: Path, out: Path, repeats: int, size: int) -> Path:
    """Face crop (content-aware centre when no face) into kohya's layout; returns the image folder."""
    from lib_lora.config import PrepareConfig
    from lib_lora.dataset.prepare import prepare_dataset

    report = prepare_dataset(photos, PrepareConfig(name="zhang", out=str(out), repeats=repeats, size=size))
    return Path(report.image_dir)


def tag(folder: Path) -> None:
    """The tutorial's Deepbooru step, with the tiny DeepDanbooru model committed for the tests
    (a real model file can be given with FAST_LORA_DD_MODEL; nothing is downloaded)."""
    from lib_lora.config import TagConfig, validate
    from lib_lora.tagging.captions import tag_dataset
    from lib_lora.tagging.taggers import load_tagger

    model = os.environ.get("FAST_LORA_DD_MODEL") or Path(__file__).resolve().parents[1] / "tests/fixtures/taggers/deepdanbooru"
    tagger = load_tagger("deepdanbooru", model, allow_download=False)
    tag_dataset(folder, tagger, validate(TagConfig()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--base-model", default="tiny", help="tiny, sd15-random (full size, random weights) or a model path")
    ap.add_argument("--images", type=int, default=35)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--resolution", type=int, default=None, help="512 on CUDA, 256 with --cpu")
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: all 1050)")
    ap.add_argument("--lr", default="auto", help="'auto' runs this build's LR probe")
    ap.add_argument("--optimizer", default="adamw8bit")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lib_lora.config import TrainConfig
    from lib_lora.training.run import Trainer

    cuda = torch.cuda.is_available() and not args.cpu
    res = args.resolution or (512 if cuda else 256)
    machine = torch.cuda.get_device_name() if cuda else f"CPU {os.cpu_count()} cores"
    print(f"# {machine}; torch {torch.__version__}; model {args.base_model}; {args.images} images x {args.repeats}"
          f" at {res}²; load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    ph = Phases()
    t_all, c_all = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos = make_dataset(work / "photos", args.images, args.repeats, size=res)
        prepared = ph.run("prepare (crop)", prepare, photos / f"{args.repeats}_zhang", work / "prepared", args.repeats, res)
        dataset = prepared.parent if prepared is not None else photos
        # Tag what prepare produced, else the photos' own folder (its synthetic captions are replaced).
        ph.run("tag (Deepbooru)", tag, prepared if prepared is not None else photos / f"{args.repeats}_zhang")
        cfg = TrainConfig(
            name="zhang", dataset=str(dataset), base_model=args.base_model, output_dir=str(work / "out"),
            run_dir=str(work / "run"), resolution=res, lr=args.lr, optimizer=args.optimizer, dim=128, alpha=64.0,
            max_steps=args.steps, device="cuda" if cuda else "cpu", log_every_n_steps=50,
        )  # fmt: skip
        # sd15-random: the full-size architecture with random weights, where no SD1.5 file can be had.
        tr = Trainer(cfg, sd15_random_backbone("cuda" if cuda else "cpu") if args.base_model == "sd15-random" else None)
        tr.state.started_at, tr.state.name = time.time(), "zhang"
        tr.state.session_id = "bench"
        from lib_lora.names import output_file

        tr.state.lora_path = output_file(cfg.output_dir, tr.state.name, ".safetensors", overwrite=True)
        try:
            ph.run("read dataset", lambda: (tr.prepare_run_dir(), tr.load_data()))
            ph.run("load model", tr.load_model)
            ph.run("cache latents", tr.cache_latents)
            ph.run("build LoRA", tr.build_network)
            ph.run("LR probe (lr=auto)", tr.resolve_lr)
            ph.run("optimizer + logs", lambda: (tr.build_optimizer(), tr.open_logs()))
            if hasattr(tr, "begin_reliability"):  # issue 5's step guard and resumable state
                ph.run("reliability set-up", tr.begin_reliability)
            t0 = time.perf_counter()
            ph.run(f"train {tr.state.total_steps} steps", tr.train_loop)
            per = (time.perf_counter() - t0) / max(1, tr.state.step)
            ph.rows[-1]["note"] = ph.rows[-1]["note"] or f"{1 / per:.2f} it/s, final loss {tr.state.final_loss:.4f}"
            ph.run("save LoRA", tr.save_lora, tr.state.lora_path, True, True)
        finally:
            tr.close()
    ph.rows.append({"phase": "total", "seconds": round(time.perf_counter() - t_all, 2),
                    "cpu_s": round(time.process_time() - c_all, 2), "note": ""})  # fmt: skip
    print(table(ph.rows, ["phase", "seconds", "cpu_s", "note"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "resolution": res, "rows": ph.rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
