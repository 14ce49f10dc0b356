"""`python -m lib_lora train DATASET --name NAME ...`: flags come from TrainConfig."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib_lora.config import PRESETS, TrainConfig, add_arguments, apply_preset, from_args
from lib_lora.errors import UserError
from lib_lora.training.data import SUBSET_RE
from lib_lora.user_presets import FOLDER

# config_from_args has layered every field (family defaults, files, preset, flags): all count as given.
ALL_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a LoRA on a folder of images",
        description="Train an SD1.5 or SDXL LoRA (the family of --base-model, whose defaults fill the flags "
        "not given). DATASET is a folder of <repeats>_<name> subfolders or a plain folder of images (with --repeats).",
    )
    p.add_argument("dataset", metavar="DATASET", nargs="?", default=None,
                   help="dataset folder (may come from --config instead)")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="read the options from FILE: ours (.toml, or a run folder's config.json), a kohya_ss "
                        ".json, or sd-scripts' --config_file / --dataset_config .toml; repeatable, later files "
                        "win; flags given here override them")
    p.add_argument("--save-config", metavar="FILE",
                   help="write the options (files, preset and flags together) to FILE (.toml or .json) and stop "
                        "without training")
    p.add_argument("--preset", help=f"start from a recipe (the base model's family's): {', '.join(PRESETS)} or one saved with --save-preset; "
                                    "other flags override it")
    p.add_argument("--save-preset", metavar="NAME",
                   help="save the recipe (all options but the name, data and folders) as preset NAME and stop")
    p.add_argument("--presets-dir", default=str(Path("work") / FOLDER), metavar="DIR",
                   help="where user presets are kept (default: work/presets, the ui command's)")
    p.add_argument("--plan-only", action="store_true", help="print the step plan and stop")
    add_arguments(p, TrainConfig, skip=("dataset",))
    p.set_defaults(func=run_train)


def config_from_args(args: argparse.Namespace, reports: list[str] | None = None) -> TrainConfig:
    """The options in order, each over the one before: the base model's family defaults, the
    config files (`--config`), the preset, then the flags given. Here, unlike a form, a flag not
    given is known, so `--train-text-encoder` keeps SDXL's encoders on. What the files or the
    preset held that is not used is appended to `reports` (one message per file)."""
    from lib_lora.config_files import file_config, read_config_file
    from lib_lora.training.distributed import launched_processes
    from lib_lora.training.run_config import config_family

    files = [read_config_file(p) for p in getattr(args, "config", None) or []]
    user_preset = None
    if args.preset and args.preset not in PRESETS:
        from lib_lora.user_presets import read_preset

        user_preset = read_preset(getattr(args, "presets_dir", Path("work") / FOLDER), args.preset)
    layers = files + ([user_preset] if user_preset else [])
    for cf in layers:
        if reports is not None and cf.report():
            reports.append(cf.report())
    # Under a launcher, a data-parallel run's config.json keeps its global batch (file_config);
    # a --batch-size flag (per process) replaces the file's batch, so nothing is split then.
    world = launched_processes() if getattr(args, "batch_size", None) is None else 1
    family = config_family(from_args(TrainConfig, args, base=file_config(layers, TrainConfig(), world)))
    base = file_config(files, dataclasses.replace(TrainConfig(), **family.config_defaults()), world)
    if user_preset is not None:
        base = file_config([user_preset], base)
    elif args.preset:
        base = apply_preset(base, args.preset, family)
    cfg = from_args(TrainConfig, args, base=base)
    if args.dataset:
        cfg = dataclasses.replace(cfg, dataset=args.dataset)
    if not cfg.name and cfg.dataset:
        # Default to the dataset's name, without a kohya '<repeats>_' prefix.
        folder = Path(cfg.dataset).resolve().name
        m = SUBSET_RE.match(folder)
        cfg = dataclasses.replace(cfg, name=m[2] if m else folder)
    return cfg


def bar_events(bar: Any) -> Callable[[dict], None]:
    """The training's events on the CLI: lines above the one bar (which stays, so its rate
    leaves pauses out), the loss or the probe's d*lr after it."""

    def on_event(e: dict) -> None:
        kind = e["kind"]
        if kind in ("phase", "plan"):
            bar.write(e["text"])
        elif kind == "saved" and "checkpoints" in e["path"]:
            bar.write(f"saved {e['path']}")
        elif kind == "loss":
            bar.set_postfix(f"loss {e['loss']:.4f}")
        elif kind == "probe":
            bar.set_postfix(f"d*lr {e['dlr']:.3g}")

    return on_event


def print_plan(cfg: TrainConfig, plan: Any) -> None:
    """The step plan, the LR probe's steps before it, and the time a measured run predicts."""
    from lib_lora.training import timing
    from lib_lora.training.family import SD15
    from lib_lora.training.optim import lr_plan
    from lib_lora.training.probe import probe_budget
    from lib_lora.training.run_config import config_family, family_note

    print(plan.describe())
    print(lr_plan(cfg))
    family = config_family(cfg)
    if family is not SD15:
        print(family_note(cfg, family))
    total = plan.total_steps
    if cfg.lr == "auto":
        budget = probe_budget(total, cfg.probe_fraction, cfg.probe_min_steps, cfg.probe_max_steps)
        print(f"LR probe first: up to {budget} steps (it stops once the rate settles); up to {budget + total} in all")
        total += budget
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / cfg.name
    est = timing.find([run_dir, *sorted(p for p in run_dir.parent.glob("*") if p.is_dir())], cfg)
    if est is None:
        print("time: no estimate yet (a finished run with this model, device, resolution and batch size gives one)")
    else:
        print(f"time: about {est.minutes(total):.0f} min ({est.seconds_per_step:.2f} s/step measured by the run "
              f"{est.run!r} on {est.device})")


def run_train(args: argparse.Namespace) -> int:
    from lib_lora.progress import TqdmProgress
    from lib_lora.training import distributed
    from lib_lora.training.data import plan_steps
    from lib_lora.training.metadata import summary
    from lib_lora.training.run import train
    from lib_lora.training.run_config import prepare_train_config

    # The CLI's host decides nothing: its flags do (the family's defaults are in config_from_args).
    reports: list[str] = []
    cfg = config_from_args(args, reports)
    for text in reports:
        print(f"note: {text}", file=sys.stderr)
    if args.save_preset:
        from lib_lora.user_presets import save_preset

        print(f"preset saved: {save_preset(args.presets_dir, args.save_preset, cfg)}")
        return 0
    if args.save_config:
        from lib_lora.config_files import save_config_file

        print(f"config written: {save_config_file(cfg, args.save_config)}")
        return 0
    if not cfg.dataset and not getattr(cfg, "subsets", None):
        raise UserError("No dataset folder given: pass DATASET, or a --config file that names one.")
    cfg = prepare_train_config(None, cfg, given=ALL_FIELDS)
    # Under accelerate launch or torchrun: one of N data-parallel processes (training/distributed.py).
    procs = distributed.start(cpu=cfg.device == "cpu")
    try:
        cfg = distributed.global_config(cfg, procs)
        if args.plan_only:
            if procs.is_main:
                print_plan(cfg, plan_steps(cfg.dataset, cfg))
            return 0
        if procs.many and procs.is_main:
            print(f"{procs.world} processes, {cfg.batch_size // procs.world} images each per step: a global batch "
                  f"of {cfg.batch_size}, on {cfg.device.split(':')[0]}")
        bar = TqdmProgress(desc="train", unit="step") if procs.is_main else None
        try:
            result = train(cfg, progress=bar, on_event=bar_events(bar) if bar is not None else None, procs=procs)
        except RuntimeError as err:
            lost = distributed.lost_peer(err) if procs.many else None
            if lost is None:
                raise
            raise lost from None
        finally:
            if bar is not None:
                bar.close()
    finally:
        distributed.stop(procs)
    if not procs.is_main:
        return 0
    print(f"LoRA written: {result.lora_path}")
    print(f"run folder:   {result.run_dir}  (config, TensorBoard logs, checkpoints)")
    print(f"final loss:   {result.final_loss:.4f} after {result.steps} steps")
    print(summary(result.metadata))
    return 0
