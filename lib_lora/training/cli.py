"""`python -m lib_lora train DATASET --name NAME ...`: flags come from TrainConfig."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib_lora.config import PRESETS, TrainConfig, add_arguments, from_args
from lib_lora.training.data import SUBSET_RE


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a LoRA on a folder of images",
        description="Train an SD1.5 or SDXL LoRA (the family of --base-model, whose defaults fill the flags "
        "not given). DATASET is a folder of <repeats>_<name> subfolders or a plain folder of images (with --repeats).",
    )
    p.add_argument("dataset", metavar="DATASET", help="dataset folder")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a recipe (the base model's family's); other flags override it")
    p.add_argument("--plan-only", action="store_true", help="print the step plan and stop")
    add_arguments(p, TrainConfig, skip=("dataset",))
    p.set_defaults(func=run_train)


def given_flags(args: argparse.Namespace) -> frozenset[str]:
    """The TrainConfig fields the command line gave (a flag not given parses as None)."""
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if getattr(args, f.name, None) is not None)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The flags given over the base model's family defaults and the family's preset
    (`prepare_train_config`): a flag not given is known here, so `--resolution 512` stays
    512 on SDXL and `--train-text-encoder` turns SDXL's encoders on."""
    from lib_lora.training.run_config import prepare_train_config

    cfg = dataclasses.replace(from_args(TrainConfig, args), dataset=args.dataset)
    given = given_flags(args) | {"dataset"}
    if not cfg.name:
        # Default to the dataset's name, without a kohya '<repeats>_' prefix.
        folder = Path(args.dataset).resolve().name
        m = SUBSET_RE.match(folder)
        cfg = dataclasses.replace(cfg, name=m[2] if m else folder)
        given |= {"name"}
    return prepare_train_config(None, cfg, given=given, preset=args.preset)


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
    from lib_lora.training.data import plan_steps
    from lib_lora.training.metadata import summary
    from lib_lora.training.run import train

    # The CLI's host decides nothing: its flags do, over the family's defaults (config_from_args).
    cfg = config_from_args(args)
    if args.plan_only:
        print_plan(cfg, plan_steps(cfg.dataset, cfg))
        return 0
    bar = TqdmProgress(desc="train", unit="step")
    try:
        result = train(cfg, progress=bar, on_event=bar_events(bar))
    finally:
        bar.close()
    print(f"LoRA written: {result.lora_path}")
    print(f"run folder:   {result.run_dir}  (config, TensorBoard logs, checkpoints)")
    print(f"final loss:   {result.final_loss:.4f} after {result.steps} steps")
    print(summary(result.metadata))
    return 0
