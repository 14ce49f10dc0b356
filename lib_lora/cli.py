"""`python -m lib_lora <command>`.

Each command lives beside the step it runs, in a module that defines
`register(subparsers)`; that function adds its sub-parser and sets `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lib_lora.errors import Cancelled, UserError

# Modules that provide commands, in the order of the workflow.
COMMAND_MODULES = [
    "lib_lora.demo",              # demo
    "lib_lora.dataset.cli",       # prepare
    "lib_lora.tagging.cli",       # tag, tags
    "lib_lora.training.cli",      # train
    "lib_lora.ui.cli",            # ui
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_lora", description="Fast LoRA: SD1.5 LoRA training.")
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # that step is not part of this build yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Cancelled):
        print("stopped.", file=sys.stderr)
        return 130
