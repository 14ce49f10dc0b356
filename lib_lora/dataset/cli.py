"""`python -m lib_lora prepare SRC --name NAME --out WORK_DIR ...`"""

from __future__ import annotations

import argparse

from lib_lora.config import PrepareConfig, add_arguments, from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="import, check, crop and cut out a folder of photos into a training folder",
        description="Steps 1-2: import a folder of images (never modified), crop each around the main face "
        "(or centre/bucket/none), optionally remove the background, and write <out>/<name>/<repeats>_<name>/.",
    )
    p.add_argument("src", metavar="SRC", help="folder of source images (read only)")
    add_arguments(p, PrepareConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lib_lora.dataset.prepare import prepare_dataset
    from lib_lora.progress import TqdmProgress

    cfg = from_args(PrepareConfig, args)
    if not cfg.name:
        from pathlib import Path

        cfg.name = Path(args.src).resolve().name  # default: the source folder's name
    progress = TqdmProgress(desc="prepare", unit="img")
    try:
        report = prepare_dataset(args.src, cfg, progress)
    finally:
        progress.close()
    print(report.summary())
    return 0
