"""SIGTERM (a service manager, `kill`, a closing terminal) stops a CLI training run the way
Ctrl-C does: the interrupted checkpoint and the resumable state are saved, nothing partial
lands in the LoRA folder, and the same command resumes from the stopped step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_rel import make_dataset

from lib_lora.training.state import load_state, state_path

ROOT = Path(__file__).resolve().parents[2]
STEPS = 80  # enough that the signal comes mid-run (a tiny-model step is ~0.1 s)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
def test_sigterm_saves_the_state_and_the_same_command_resumes(tmp_path, sig):
    ds = make_dataset(tmp_path / "data")
    run_dir, out = tmp_path / "run", tmp_path / "out"
    cmd = [sys.executable, "-m", "lib_lora", "train", str(ds), "--name", "term", "--base-model", "tiny",
           "--output-dir", str(out), "--run-dir", str(run_dir), "--resolution", "64", "--min-bucket-reso", "64",
           "--max-bucket-reso", "128", "--dim", "4", "--optimizer", "adamw", "--lr", "1e-3", "--max-steps", str(STEPS),
           "--device", "cpu", "--state-every-n-steps", "0", "--log-every-n-steps", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = run_dir / "logs" / "events.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # a few steps into training
        if events.is_file() and events.read_text(encoding="utf-8").count('"kind": "loss"') >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"stopped ({signal.Signals(sig).name})" in err and "Traceback" not in err

    saved = load_state(state_path(run_dir))  # the state of the step it stopped at (none periodic)
    stopped_at = saved["step"]
    assert 3 <= stopped_at < STEPS
    assert (run_dir / "checkpoints" / f"term-interrupted-step{stopped_at:06d}.safetensors").is_file()
    assert not out.exists() or not list(out.iterdir())  # nothing in the LoRA folder yet

    # The same command again resumes at the stopped step and finishes.
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"step {stopped_at}" in res.stderr
    lines = [json.loads(ln) for ln in events.read_text(encoding="utf-8").splitlines()]
    losses = [e["step"] for e in lines if e["kind"] == "loss"]
    assert losses[-1] == STEPS and (out / "term.safetensors").is_file()
