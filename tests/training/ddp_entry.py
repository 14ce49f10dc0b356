"""One process of a data-parallel test run: `torchrun ... ddp_entry.py CLI ARGS` runs the CLI
(`python -m lib_lora CLI ARGS`) unchanged and records, in $DDP_TEST_LOG/rank<RANK>.txt:

    pid <pid>                      at start
    write <path>                   each file or folder under $DDP_TEST_WATCH this process opens for
                                   writing, creates, renames or removes (Python's audit events;
                                   files written by native code are seen at their rename)
    lr <unet lr> <text-encoder lr> the learning rate the LR probe step gave this process
    error <text>                   each `error: ...` line the CLI prints on stderr
    exit <code>                    the CLI's exit code, when it returns
    with $DDP_TEST_LATE_STATE=PATH, rank 1 runs the trainer's first step (the look for a
    half-done export) only once PATH is gone (the main process removed the state) or 15 s
    passed: the latest moment another process can be at that point
    stopped                        with $DDP_TEST_STOP_STEP=K on rank $DDP_TEST_STOP_RANK: this
                                   process stops itself (SIGSTOP) as it enters step K+1, so the
                                   test can kill it exactly there
    with $DDP_TEST_ELSEWHERE=PATH on rank 1, the argument PATH names a folder that is not there
    (another machine without the dataset)

Only the moment of a stop is chosen and the writes observed; the code under test is not changed.
"""

from __future__ import annotations

import os
import signal
import sys
import time

RANK = os.environ.get("RANK", "0")
LOG = open(os.path.join(os.environ["DDP_TEST_LOG"], f"rank{RANK}.txt"), "a", buffering=1, encoding="utf-8")  # noqa: SIM115
WATCH = os.path.realpath(os.environ["DDP_TEST_WATCH"])
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _watched(path: object) -> bool:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return isinstance(path, str) and os.path.realpath(path).startswith(WATCH)


def _audit(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
        if writing and _watched(path):
            LOG.write(f"write {path}\n")
    elif event == "os.mkdir":  # Path.mkdir(exist_ok=True) of a folder that is there creates nothing
        if _watched(args[0]) and not os.path.exists(args[0]):
            LOG.write(f"write {args[0]}\n")
    elif event in ("os.rename", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree"):
        if args and _watched(args[0]):
            LOG.write(f"write {args[0]}\n")


class _ErrorTee:
    """stderr as it is, with each `error: ...` line the CLI prints also in the rank's log."""

    def __init__(self, stream):  # noqa: ANN001
        self.stream = stream

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.startswith("error: "):
                LOG.write(f"error {line[len('error: '):]}\n")
        return self.stream.write(text)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.stream, name)


def _install() -> None:
    import lib_lora.training.distributed as dist

    probe_once = dist.probe_once

    def recorded(rs, probe):  # noqa: ANN001, ANN202
        lr = probe_once(rs, probe)
        LOG.write(f"lr {lr[0]!r} {lr[1]!r}\n")
        return lr

    dist.probe_once = recorded
    late = os.environ.get("DDP_TEST_LATE_STATE")
    if late and RANK == "1":
        from lib_lora.training.run import Trainer

        written_export = Trainer.written_export

        def later(self):  # noqa: ANN001, ANN202
            deadline = time.time() + 15
            while os.path.exists(late) and time.time() < deadline:
                time.sleep(0.2)
            return written_export(self)

        Trainer.written_export = later
    stop_step = os.environ.get("DDP_TEST_STOP_STEP")
    if stop_step is not None and RANK == os.environ.get("DDP_TEST_STOP_RANK", "1"):
        train_share, calls = dist.train_share, [0]

        def stopping(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[0] += 1
            if calls[0] == int(stop_step) + 1:
                LOG.write("stopped\n")
                os.kill(os.getpid(), signal.SIGSTOP)
                while True:
                    time.sleep(3600)
            return train_share(*args, **kwargs)

        dist.train_share = stopping


if __name__ == "__main__":
    LOG.write(f"pid {os.getpid()}\n")
    _install()
    sys.addaudithook(_audit)
    from lib_lora.cli import main

    sys.stderr = _ErrorTee(sys.stderr)
    args = sys.argv[1:]
    elsewhere = os.environ.get("DDP_TEST_ELSEWHERE")
    if elsewhere and RANK == "1":
        args = [a + "_not_on_this_machine" if a == elsewhere else a for a in args]
    code = main(args)
    LOG.write(f"exit {code}\n")
    raise SystemExit(code)
