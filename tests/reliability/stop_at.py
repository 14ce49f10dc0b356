"""Run the CLI as a real process that stops itself (SIGSTOP) at a chosen point, so a test can
kill -9 it exactly there and then look at what the kill left:

    python stop_at.py call MODULE FUNC -- CLI ARGS     stops on entering MODULE.FUNC
    python stop_at.py rename SUFFIX N -- CLI ARGS      stops before the rename of a temporary file
                                                       onto a file ending in SUFFIX, once N are done

The code under test runs unchanged; only the moment of the kill is chosen. The test waits for
the stop (`os.waitpid(pid, os.WUNTRACED)`) and then sends SIGKILL.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time


def _stop() -> None:
    """Stop here for good: SIGSTOP (the test waits for it, then kills), and never go on, since
    the stop can land a moment after kill() returns."""
    os.kill(os.getpid(), signal.SIGSTOP)
    while True:
        time.sleep(3600)


def stop_on_call(module: str, func: str) -> None:
    mod = importlib.import_module(module)
    getattr(mod, func)  # it exists

    def stopped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202, ARG001 - any signature
        _stop()

    setattr(mod, func, stopped)


def stop_on_rename(suffix: str, after: int) -> None:
    from lib_lora.atomic import TMP_MARK

    real = os.replace
    lock = threading.Lock()  # renames from a writer's thread pool: exactly `after` get through
    done = 0

    def replace(src, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - os.replace's signature
        nonlocal done
        if TMP_MARK not in os.fspath(src) or not os.fspath(dst).endswith(suffix):
            return real(src, dst, *args, **kwargs)
        with lock:
            if done >= after:
                _stop()
            done += 1
            return real(src, dst, *args, **kwargs)

    os.replace = replace


def main(argv: list[str]) -> int:
    cut = argv.index("--")
    spec, cli_args = argv[:cut], argv[cut + 1:]
    if spec[0] == "call":
        stop_on_call(spec[1], spec[2])
    elif spec[0] == "rename":
        stop_on_rename(spec[1], int(spec[2]))
    else:
        raise SystemExit(f"unknown stop point {spec!r}")
    from lib_lora.cli import main as cli_main

    return cli_main(cli_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
