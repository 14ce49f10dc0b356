"""kill -9 at random moments of real CLI training runs: during training, while a checkpoint or
the state is being written, and during the final export. After each kill the LoRA folder holds
no partial or unreadable file; the same command then resumes, finishes, and removes the
temporary files the killed process left. FASTLORA_CRASH_TRIALS sets the number of trials."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from helpers_rel import make_dataset
from safetensors import safe_open

from lib_lora.atomic import TMP_MARK

ROOT = Path(__file__).resolve().parents[2]
STEPS = 16
MODES = ["train", "checkpoint", "export"]


def _cmd(tmp: Path, ds: Path, name: str) -> list[str]:
    return [
        sys.executable, "-m", "lib_lora", "train", str(ds), "--name", name, "--base-model", "tiny",
        "--output-dir", str(tmp / "out"), "--run-dir", str(tmp / "runs" / name), "--resolution", "64",
        "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--dim", "8", "--alpha", "4",
        "--optimizer", "adamw", "--lr", "1e-3", "--max-steps", str(STEPS), "--device", "cpu",
        "--state-every-n-steps", "2", "--save-every-n-steps", "4", "--log-every-n-steps", "1",
    ]  # fmt: skip


def _temps(*folders: Path) -> list[Path]:
    out = []
    for f in folders:
        if f.is_dir():
            out += [p for p in f.rglob("*") if TMP_MARK in p.name]
    return out


def _check_lora_folder(out: Path) -> list[str]:
    """Every visible file in the LoRA folder is a complete, finite safetensors file."""
    problems = []
    if not out.is_dir():
        return problems
    for p in out.iterdir():
        if TMP_MARK in p.name:
            continue  # hidden temporary name: the WebUI never lists it, the next start removes it
        try:
            with safe_open(str(p), framework="pt") as fh:
                for k in fh.keys():
                    if not torch.isfinite(fh.get_tensor(k).float()).all():
                        problems.append(f"{p.name}: non-finite {k}")
        except Exception as err:  # noqa: BLE001
            problems.append(f"{p.name}: unreadable ({err})")
    return problems


def _kill_when(proc: subprocess.Popen, mode: str, run_dir: Path, out: Path, rng: random.Random) -> str:
    """Wait for the moment `mode` names, then SIGKILL. Returns what was caught."""
    deadline = time.time() + 300
    events = run_dir / "logs" / "events.jsonl"
    if mode == "train":
        # A random moment after training started.
        while time.time() < deadline and proc.poll() is None:
            if events.is_file() and '"kind": "loss"' in events.read_text(encoding="utf-8", errors="replace"):
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
    else:
        watch = [run_dir / "state", run_dir / "checkpoints"] if mode == "checkpoint" else [out]
        skip = rng.randint(0, 3) if mode == "checkpoint" else 0  # not always the first write
        seen = 0
        while time.time() < deadline and proc.poll() is None:
            if _temps(*watch):
                if seen >= skip:
                    break
                seen += 1
                while _temps(*watch) and proc.poll() is None:
                    pass
            time.sleep(0.0005)
    if proc.poll() is not None:
        return "finished-before-kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "mid-write" if _temps(run_dir, out) else "killed"


def test_kill_9_never_leaves_a_broken_lora(tmp_path):
    trials = int(os.environ.get("FASTLORA_CRASH_TRIALS", "10"))
    ds = make_dataset(tmp_path / "data", n=2)
    rng = random.Random(int(os.environ.get("FASTLORA_CRASH_SEED", "5")))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    tally: dict[str, int] = {}
    for i in range(trials):
        mode = MODES[i % len(MODES)]
        name = f"crash{i}"
        run_dir, out = tmp_path / "runs" / name, tmp_path / "out"
        proc = subprocess.Popen(_cmd(tmp_path, ds, name), cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        caught = _kill_when(proc, mode, run_dir, out, rng)
        tally[f"{mode}:{caught}"] = tally.get(f"{mode}:{caught}", 0) + 1
        assert _check_lora_folder(out) == [], (i, mode)
        # The same command again: resumes (or, killed between export and clean-up, finds it done).
        res = subprocess.run(_cmd(tmp_path, ds, name), cwd=tmp_path, env=env, capture_output=True, text=True)
        lora = out / f"{name}.safetensors"
        if res.returncode != 0:
            assert "already exists" in res.stderr and lora.is_file(), (i, mode, res.stderr[-2000:])
        elif caught != "finished-before-kill":
            assert "Resuming at step" in res.stderr or "step 0" in res.stderr or "Training" in res.stderr
        assert lora.is_file(), (i, mode, res.stderr[-2000:])
        with safe_open(str(lora), framework="pt") as fh:
            assert fh.metadata()["ss_steps"] == str(STEPS)
        assert _check_lora_folder(out) == []
        assert _temps(run_dir, out) == [], (i, mode)
    print("crash trials:", tally)
    (tmp_path / "tally.txt").write_text(repr(tally))
    report = os.environ.get("FASTLORA_CRASH_REPORT")
    if report:
        Path(report).write_text(repr(tally) + "\n", encoding="utf-8")
