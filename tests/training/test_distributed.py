"""Data-parallel training: 2 CPU processes (gloo) launched as real subprocesses through
`accelerate launch` and `torch.distributed.run`, on the built-in tiny model.

How close "the same LoRA" is, and why: the 2-process run trains exactly the samples, noise
and timesteps of the 1-process run with the batch doubled, so the only difference is float
order: the U-Net runs each sample in a batch of 1 instead of 2 (other kernel blocking), and
the batch mean is taken partly by DDP's all-reduce. On this model that moves the gradients by
~3e-4 relative (measured: batch 2 vs. two batches of 1 on the same inputs, one process; the
gradients are sums with heavy cancellation). AdamW then normalises each element's update to
about ±lr, so an element whose gradient is zero up to that error can step the other way: the
LoRA's trained weights (`lora_up`, zero at the start, so they are the training's whole
movement) came out 3e-3 to 5e-3 apart relative (L2) after 6 steps. TOL = 5e-2 leaves 10x for other
CPUs and thread counts and is still ~25x below what a real difference makes (1 process with
batch 1 instead of 2: 1.2 apart), and every element stays within AdamW's bound of
2 x lr x steps.

Why batches of 1 per process: a bucket batch of 3 shared 2 + 1 moves this model's gradients by
1.2e-2 relative from the batch of 3 (measured in one process, same inputs: float order alone),
which AdamW turns into LoRAs 0.27 apart, too close to what a wrong share weight gives (0.33)
for the comparison to tell them apart. The shares' weights are checked exactly in
test_distributed_units.py instead.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib_lora.config import TrainConfig
from lib_lora.training.export import read_lora, read_metadata
from lib_lora.training.run import train

ROOT = Path(__file__).resolve().parents[2]
ENTRY = Path(__file__).with_name("ddp_entry.py")
STEPS, LR = 6, 1e-3
TOL = 5e-2
pytestmark = pytest.mark.timeout(900)  # a few process launches on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Three buckets of 3 samples: at a global batch of 2 each bucket ends in a batch of 1, which
    # one process trains while the other trains a copy at weight 0.
    root = tmp_path_factory.mktemp("ddp_data")
    sub = root / "3_tok"
    sub.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(64, 64), (96, 64), (64, 96)]):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(sub / f"img{i}.png")
        (sub / f"img{i}.txt").write_text(f"tok, tag{i}, red", encoding="utf-8")
    return root


COMMON = dict(base_model="tiny", resolution=64, min_bucket_reso=64, max_bucket_reso=128, dim=4, alpha=2.0,
              optimizer="adamw", lr=str(LR), max_steps=STEPS, seed=7, device="cpu", save_precision="fp32",
              log_every_n_steps=1, state_every_n_steps=2)  # fmt: skip


def _flags(**kw: object) -> list[str]:
    out = []
    for k, v in {**COMMON, **kw}.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DDP_TEST_LOG=str(tmp / "log"),
               DDP_TEST_WATCH=str(tmp / "work"))  # fmt: skip
    (tmp / "log").mkdir(exist_ok=True)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), *args]  # fmt: skip


def _one_process(dataset: Path, work: Path, name: str, batch: int, **kw: object):
    cfg = TrainConfig(name=name, dataset=str(dataset), output_dir=str(work / "out"), run_dir=str(work / "runs" / name),
                      batch_size=batch, **{**COMMON, **kw})  # fmt: skip
    torch.set_num_threads(1)
    return train(cfg)


def _trained(path: Path) -> torch.Tensor:
    t = read_lora(path)[0]
    return torch.cat([t[k].flatten().double() for k in sorted(t) if "lora_up" in k])


def _assert_same_lora(got: Path, want: Path) -> None:
    a, b = _trained(got), _trained(want)
    rel = float((a - b).norm() / b.norm())
    print(f"LoRA {got.name} vs {want.name}: {rel:.3g} relative, {float((a - b).abs().max()):.3g} at most")
    assert rel < TOL, f"the LoRAs differ by {rel:.3g} relative (float order alone gives ~5e-3)"
    assert float((a - b).abs().max()) <= 2 * LR * STEPS


@pytest.fixture(scope="module")
def one_process(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: 1 process, batch 2."""
    return _one_process(dataset, tmp_path_factory.mktemp("one"), "one", 2).lora_path


def test_accelerate_two_processes_train_the_one_process_lora(dataset: Path, one_process: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "lib_lora", "train", str(dataset), "--name", "two", "--output-dir", str(work / "out"),
           "--run-dir", str(work / "runs" / "two"), "--batch-size", "1", *_flags()]  # fmt: skip
    res = subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 processes, 1 images each per step: a global batch of 2" in res.stdout
    lora = work / "out" / "two.safetensors"
    _assert_same_lora(lora, one_process)
    md = read_metadata(lora)
    assert (md["ss_batch_size_per_device"], md["ss_total_batch_size"], md["fastlora_processes"]) == ("1", "2", "2")
    assert md["ss_max_train_steps"] == read_metadata(one_process)["ss_max_train_steps"]


def _log(tmp: Path, rank: int) -> list[str]:
    path = tmp / "log" / f"rank{rank}.txt"
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def test_probe_runs_once_and_only_the_main_process_writes(dataset: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    cmd = _torchrun(2, str(ENTRY), "train", str(dataset), "--name", "probed", "--output-dir", str(work / "out"),
                    "--run-dir", str(work / "runs" / "probed"), "--batch-size", "1",
                    *_flags(lr="auto", probe_min_steps=4, probe_max_steps=4, probe_window=2, max_steps=2,
                            save_every_n_steps=1, sample_every_n_steps=2, sample_steps=2, cache_latents_to_disk=True))  # fmt: skip
    res = subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    main, other = _log(tmp_path, 0), _log(tmp_path, 1)
    lrs = [line for line in main if line.startswith("lr ")]
    assert len(lrs) == 1 and lrs == [line for line in other if line.startswith("lr ")]  # the same value on both
    md = read_metadata(work / "out" / "probed.safetensors")
    assert float(md["ss_unet_lr"]) == float(lrs[0].split()[1])
    assert (res.stdout + res.stderr).count("Finding the learning rate") == 1  # one probe, on the main process
    written = [line for line in main if line.startswith("write ")]
    for part in ("config.json", "probed.safetensors", "state.pt", "events.jsonl", "lr_probe.json", "latent_cache",
                 "checkpoints", "samples", "tfevents"):
        assert any(part in line for line in written), f"the main process wrote no {part}"
    assert [line for line in other if line.startswith("write ")] == []  # the other process wrote nothing


def test_a_killed_process_leaves_a_run_that_resumes_on_one_process(dataset: Path, one_process: Path,
                                                                   tmp_path: Path) -> None:
    work = tmp_path / "work"
    env = _env(tmp_path) | {"DDP_TEST_STOP_STEP": "4", "DDP_TEST_STOP_RANK": "1"}
    cmd = _torchrun(2, str(ENTRY), "train", str(dataset), "--name", "killed", "--output-dir", str(work / "out"),
                    "--run-dir", str(work / "runs" / "killed"), "--batch-size", "1", *_flags())  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    state = work / "runs" / "killed" / "state" / "state.pt"
    try:
        deadline = time.time() + 700
        while "stopped" not in _log(tmp_path, 1):  # rank 1 stopped itself entering step 5
            assert proc.poll() is None and time.time() < deadline, "the run ended before rank 1 stopped"
            time.sleep(0.5)
        while not (state.is_file() and torch.load(state, weights_only=True)["step"] == 4):  # saved by rank 0
            assert time.time() < deadline
            time.sleep(0.5)
        pid = int(_log(tmp_path, 1)[0].split()[1])
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert not (work / "out" / "killed.safetensors").exists()
    assert torch.load(state, weights_only=True)["step"] == 4  # the stop wrote no other state
    # Resume on 1 process with the same global batch: it goes on at step 4 and ends as the
    # uninterrupted run does.
    events: list[dict] = []
    cfg = TrainConfig(name="killed", dataset=str(dataset), output_dir=str(work / "out"),
                      run_dir=str(work / "runs" / "killed"), batch_size=2, **COMMON)  # fmt: skip
    torch.set_num_threads(1)
    result = train(cfg, on_event=events.append)
    assert any("Resuming at step 4" in e.get("text", "") for e in events), out[-2000:]
    _assert_same_lora(result.lora_path, one_process)


def _plan(text: str) -> list[str]:
    """The step plan's lines of a --plan-only output (the dataset's, its buckets' and the steps')."""
    return [line for line in text.splitlines() if line.startswith(("Dataset ", "  ", "Steps: "))]


def test_a_data_parallel_runs_config_gives_the_same_plan_under_the_launcher_and_in_one_process(
        dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    cmd = _torchrun(2, "-m", "lib_lora", "train", str(dataset), "--name", "again", "--output-dir", str(work / "out"),
                    "--run-dir", str(work / "runs" / "again"), "--batch-size", "1", *_flags(max_steps=1))  # fmt: skip
    res = subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    config = work / "runs" / "again" / "config.json"
    saved = json.loads(config.read_text(encoding="utf-8"))
    assert (saved["batch_size"], saved["processes"], saved["device"]) == (2, 2, "cpu")  # the global batch, marked
    # The same launcher: each process takes 1 again, not 2 (a global batch of 4).
    again = subprocess.run(_torchrun(2, "-m", "lib_lora", "train", "--config", str(config), "--plan-only"),
                           env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    # One process: the whole global batch.
    from lib_lora.cli import main

    capsys.readouterr()
    assert main(["train", "--config", str(config), "--plan-only"]) == 0
    alone = capsys.readouterr().out
    want = _plan(subprocess.run([sys.executable, "-m", "lib_lora", "train", str(dataset), "--plan-only",
                                 *_flags(max_steps=1), "--batch-size", "2"], env=_env(tmp_path), cwd=tmp_path,
                                capture_output=True, text=True, timeout=600).stdout)  # fmt: skip
    assert any("(batch 2)" in line for line in want)
    assert _plan(again.stdout) == want
    assert _plan(alone) == want
    # Three processes cannot share a global batch of 2: one sentence, before any process starts work.
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["train", "--config", str(config), "--plan-only"]) == 2
    assert "holds a global batch of 2 (trained on 2 processes), which does not split over 3" in capsys.readouterr().err


def _errors_of_both(cmd: list[str], env: dict[str, str], tmp_path: Path) -> tuple[list[list[str]], str, int]:
    """Each rank's `error`/`exit` log lines, the output and the launcher's exit code; a hang fails."""
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=400)  # a hang fails here instead of blocking the suite
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
        pytest.fail(f"the processes did not stop: {_log(tmp_path, 0)} {_log(tmp_path, 1)}\n{out[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    errors = [[line for line in _log(tmp_path, rank) if line.startswith(("error ", "exit "))] for rank in (0, 1)]
    return errors, out, proc.returncode


def test_a_refusal_on_the_main_process_stops_every_process_with_its_sentence(dataset: Path, tmp_path: Path) -> None:
    # An unreadable saved state: only the main process reads it first (load_for_resume), so
    # before the fix the other process waited for it at a barrier.
    work = tmp_path / "work"
    state = work / "runs" / "broken" / "state" / "state.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"not a state")
    cmd = _torchrun(2, str(ENTRY), "train", str(dataset), "--name", "broken", "--output-dir", str(work / "out"),
                    "--run-dir", str(work / "runs" / "broken"), "--batch-size", "1", *_flags(max_steps=1))  # fmt: skip
    errors, out, code = _errors_of_both(cmd, _env(tmp_path), tmp_path)
    assert code != 0
    assert errors[0] == errors[1], out[-3000:]  # the same sentence and exit code on both
    assert len(errors[0]) == 2 and "cannot be read" in errors[0][0] and errors[0][1] == "exit 2", errors


def test_a_dataset_one_machine_lacks_stops_every_process_with_its_sentence(dataset: Path, tmp_path: Path) -> None:
    # Each process reads the dataset itself: the main one finds it, the other's machine has none,
    # and the main process must not wait for it at the next collective.
    work = tmp_path / "work"
    cmd = _torchrun(2, str(ENTRY), "train", str(dataset), "--name", "lacking", "--output-dir", str(work / "out"),
                    "--run-dir", str(work / "runs" / "lacking"), "--batch-size", "1", *_flags(max_steps=1))  # fmt: skip
    errors, out, code = _errors_of_both(cmd, {**_env(tmp_path), "DDP_TEST_ELSEWHERE": str(dataset)}, tmp_path)
    assert code != 0
    assert errors[0] == errors[1], out[-3000:]
    assert len(errors[0]) == 2 and "_not_on_this_machine does not exist" in errors[0][0] and errors[0][1] == "exit 2"
    assert not (work / "out" / "lacking.safetensors").exists()


def test_an_export_left_half_done_is_completed_by_the_main_process_while_the_others_wait(
        dataset: Path, tmp_path: Path) -> None:
    # One process at the global batch, killed after the final LoRA's rename, before the state's
    # clean-up: the same run under 2 processes completes that export. Before the fix each process
    # looked for it itself, and one that looked after the main process had removed the state
    # took it for a new run and was refused (the LoRA exists): the run failed (exit 2 on rank 1).
    work = tmp_path / "work"
    args = ["train", str(dataset), "--name", "half", "--output-dir", str(work / "out"),
            "--run-dir", str(work / "runs" / "half"), *_flags(max_steps=2)]  # fmt: skip
    stop_at = ROOT / "tests" / "reliability" / "stop_at.py"
    victim = subprocess.Popen([sys.executable, str(stop_at), "call", "lib_lora.training.state", "finish", "--", *args,
                               "--batch-size", "2"], env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _, status = os.waitpid(victim.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "the one-process run ended before its export's clean-up"
        victim.send_signal(signal.SIGKILL)
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait()
    state = work / "runs" / "half" / "state" / "state.pt"
    assert state.is_file() and (work / "out" / "half.safetensors").is_file()
    env = _env(tmp_path) | {"DDP_TEST_LATE_STATE": str(state)}
    res = subprocess.run(_torchrun(2, str(ENTRY), *args, "--batch-size", "1"), env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "already written by this run" in res.stdout + res.stderr
    assert [line for line in _log(tmp_path, 1) if line.startswith("exit")] == ["exit 0"]
    assert not state.exists() and (work / "out" / "half.json").is_file()
