"""`python -m lib_lora <command>`.

Each command lives beside the step it runs, in a module that defines
`register(subparsers)`; that function adds its sub-parser and sets `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

from lib_lora.errors import Cancelled, UserError, file_error, is_file_error

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


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP (a service manager, `kill`, a closed terminal): stop the way Ctrl-C does."""


def _terminate(signum: int, frame: object) -> None:
    # A second signal gets the default action (an immediate end), as users expect.
    signal.signal(signum, signal.SIG_DFL)
    raise Terminated(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_terminate() -> Iterator[None]:
    """While a command runs, SIGTERM and SIGHUP raise `Terminated` in the main thread, so a
    training run saves its interrupted checkpoint and resumable state instead of dying as
    a kill -9 would (which it also survives, but loses the steps since the last state)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {s: signal.signal(s, _terminate) for s in wanted}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code = run_command(parser, args)
    if getattr(args, "exit_at_once", False):
        # The command has saved its work and stopped its threads (the `ui` server). Unloading
        # torch, gradio and their extensions module by module would take seconds more (5-9 s
        # measured on a busy 2-core machine), which a service manager counts against its stop timeout.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with stop_on_terminate():
            return int(args.func(args) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory; close other programs or use smaller settings, then try again.", file=sys.stderr)
        return 2
    except Terminated as sig:
        print(f"stopped ({sig}).", file=sys.stderr)
        return 128 + int(getattr(signal, str(sig), signal.SIGTERM))
    except (KeyboardInterrupt, Cancelled):
        print("stopped.", file=sys.stderr)
        return 130
    except Exception as err:
        # A file operation no step turned into its own sentence (a full disk, an over-long path).
        if not is_file_error(err):
            raise
        print(f"error: {file_error(err, doing='use')}", file=sys.stderr)
        return 2
