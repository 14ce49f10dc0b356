"""`python -m lib_lora train DATASET --name NAME ...`: flags come from TrainConfig."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib_lora.config import PRESETS, TrainConfig, add_arguments, apply_preset, from_args
from lib_lora.training.data import SUBSET_RE


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a LoRA on a folder of images",
        description="Train an SD1.5 LoRA. DATASET is a folder of <repeats>_<name> subfolders "
        "or a plain folder of images (with --repeats).",
    )
    p.add_argument("dataset", metavar="DATASET", help="dataset folder")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a recipe; other flags override it")
    p.add_argument("--plan-only", action="store_true", help="print the step plan and stop")
    add_arguments(p, TrainConfig, skip=("dataset",))
    p.set_defaults(func=run_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The flags given over the base model's family defaults (and the family's preset): here,
    unlike a form, a flag not given is known, so `--train-text-encoder` keeps SDXL's encoders on."""
    from lib_lora.training.run_config import apply_family_defaults, config_family

    family = config_family(from_args(TrainConfig, args))
    base = apply_family_defaults(TrainConfig(), family)
    base = apply_preset(base, args.preset, family) if args.preset else base
    cfg = from_args(TrainConfig, args, base=base)
    cfg = dataclasses.replace(cfg, dataset=args.dataset)
    if not cfg.name:
        # Default to the dataset's name, without a kohya '<repeats>_' prefix.
        folder = Path(args.dataset).resolve().name
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
    cfg = prepare_train_config(None, config_from_args(args), family_defaults=False)
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
