"""`python -m lib_lora ui`: the standalone web app."""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from lib_lora.errors import UserError
from lib_lora.ui.serving import is_loopback

log = logging.getLogger(__name__)

# On a stop (Ctrl+C, SIGTERM): how long the running job may take to end its current step and
# write its checkpoint and resumable state, and the server to close its connections. A second
# signal ends the process at once (lib_lora.cli.stop_on_terminate).
JOB_STOP_SECONDS = 120.0
SERVER_CLOSE_SECONDS = 5.0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ui", help="start the web UI (all seven steps in the browser)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=7861, help="port (default: 7861)")
    p.add_argument("--base-model", default="tiny", help="SD1.5 or SDXL checkpoint, diffusers folder, 'tiny' or 'tiny-sdxl'")
    p.add_argument("--output-dir", default="output", help="where finished LoRAs go (default: ./output)")
    p.add_argument("--work-dir", default="work", help="where datasets and runs go (default: ./work)")
    p.add_argument("--root", action="append", default=[],
                   help="a folder the page may read and write when listening beyond loopback, and whose files "
                        "it may serve (repeatable; the work and output folders are always allowed)")
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD",
                   help="require this sign-in (repeatable). Beyond loopback a sign-in is always required: "
                        "without --auth or --auth-file a random password is made and printed at start")
    p.add_argument("--auth-file", metavar="FILE", help="a text file of USER:PASSWORD lines to sign in with")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=run, exit_at_once=True)  # see lib_lora.cli.main


def make_app(args: argparse.Namespace):  # -> gr.Blocks
    from lib_lora.hosts.standalone import StandaloneHost
    from lib_lora.ui.app import build_app
    from lib_lora.ui.paths import FolderPolicy

    host = StandaloneHost(base_model=args.base_model, output_dir=args.output_dir, work_dir=args.work_dir,
                          device=args.device)
    policy = FolderPolicy()
    if not is_loopback(args.host):
        # The model chosen with --base-model is the machine owner's choice: the page may use it.
        policy = FolderPolicy.limited([host.work_dir(), host.lora_dir(), *args.root], names=[args.base_model])
    return build_app(host, policy), host, policy


def served_folders(host, roots: list[str]) -> list[str]:
    """The folders the file route serves from: our outputs only (never the current folder)."""
    return [str(host.work_dir()), str(host.lora_dir()), *(str(Path(r).expanduser().resolve()) for r in roots)]


def start(args: argparse.Namespace):  # -> gr.Blocks, started
    """Build the page and start serving it (returns at once); the caller closes it."""
    from lib_lora.ui import compat
    from lib_lora.ui.serving import DEFAULT_USER, sign_in

    loopback = is_loopback(args.host)
    creds, password = sign_in(loopback, args.auth, args.auth_file)
    app, host, policy = make_app(args)
    if policy.restricted:
        print(f"Listening on {args.host}, beyond this machine: folder inputs are limited to {policy.describe()} "
              "(add more with --root).")
    if password:
        print(f"Sign in as {DEFAULT_USER} with the password {password} (made for this start; "
              "choose your own with --auth USER:PASSWORD or --auth-file).")
    elif creds:
        print(f"Sign-in required ({len(creds)} account{'s' if len(creds) != 1 else ''}).")
    compat.enable_queue(app)
    try:
        compat.launch(app, args.host, args.port, allowed_paths=served_folders(host, args.root), auth=creds)
    except OSError as err:
        raise UserError(f"Cannot listen on {args.host}:{args.port} ({err}); choose another --port.") from None
    return app


def run(args: argparse.Namespace) -> int:
    from lib_lora.training.distributed import single_process_note

    note = single_process_note(who="The web UI")
    if note:  # started under a multi-process launcher: the first process serves the page alone
        print(note)
        if os.environ.get("RANK", "0") != "0":
            return 0
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("The web UI needs gradio: pip install 'gradio>=3.41.2'.") from None
    app = start(args)
    print(f"Fast LoRA is running at http://{'127.0.0.1' if args.host in ('0.0.0.0', '') else args.host}:{args.port}"
          " (Ctrl+C to stop).")
    try:
        while True:
            time.sleep(3600)
    finally:
        shut_down(app)


def shut_down(app: Any, job_seconds: float = JOB_STOP_SECONDS, close_seconds: float = SERVER_CLOSE_SECONDS) -> None:
    """Stop the running job the way its Stop button does (it saves its checkpoint and state),
    then the server. Neither may hold the process: the job gets `job_seconds` to end its step,
    and the server, whose open page connections can keep it from closing, `close_seconds`."""
    ctx = getattr(app, "fast_lora", None)
    job = ctx.runner.current if ctx is not None else None
    if job is not None and job.running:
        print(f"Stopping '{job.title}': its state is saved so that starting it again resumes it "
              "(press Ctrl+C again to quit at once)...", flush=True)
        ctx.runner.stop()
        t0 = time.monotonic()
        if job.finished.wait(job_seconds):
            print(f"'{job.title}' stopped after {time.monotonic() - t0:.1f} s; its state is saved.", flush=True)
        else:
            print(f"'{job.title}' did not stop within {job_seconds:.0f} s; quitting without its latest steps.", flush=True)
    closer = threading.Thread(target=app.close, name="fast-lora-close", daemon=True)
    closer.start()
    closer.join(close_seconds)
