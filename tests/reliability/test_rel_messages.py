"""One sentence, not a traceback: a full disk, an over-long path, a symlink loop, absurd repeats,
a broken base model, a read-only output folder, through the real CLI (and the UI's handlers).

Each case checks: exit code 2, no traceback, exactly one `error:` line, the user's files as
they were."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers_rel import DEV_FULL, full_disk, make_dataset, patch_torch_save, tree_digest

from lib_lora.cli import main

ROOT = Path(__file__).resolve().parents[2]
NAME_MAX = os.pathconf("/", "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
TOO_LONG = "a" * (NAME_MAX + 1)  # one path component over the system's limit: Errno 36 wherever used


def train_args(tmp: Path, dataset: Path, *extra: str, name: str = "msg") -> list[str]:
    return ["train", str(dataset), "--name", name, "--base-model", "tiny", "--output-dir", str(tmp / "out"),
            "--run-dir", str(tmp / "runs" / name), "--resolution", "64", "--min-bucket-reso", "64",
            "--max-bucket-reso", "128", "--dim", "4", "--optimizer", "adamw", "--lr", "1e-3", "--max-steps", "2",
            "--device", "cpu", *extra]  # fmt: skip


def run_main(args: list[str], capsys) -> tuple[int, str]:
    """The CLI's main() in this process: (exit code, everything it printed)."""
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out + out.err


def run_process(args: list[str], cwd: Path) -> tuple[int, str]:
    """`python -m lib_lora ...` as a real process: (exit code, everything it printed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "lib_lora", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    return res.returncode, res.stdout + res.stderr


def one_sentence(rc: int, output: str, *words: str) -> str:
    """The run ended as a user error with one `error:` line (which names `words`); that line."""
    assert "Traceback" not in output, output[-3000:]
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1, (rc, output[-3000:])
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


# ---- a full disk ----------------------------------------------------------------------------

needs_dev_full = pytest.mark.skipif(not DEV_FULL.exists(), reason="needs /dev/full (Linux)")


@needs_dev_full
def test_full_disk_while_writing_the_run_config(tmp_path, capsys, monkeypatch):
    ds = make_dataset(tmp_path / "data")
    before = tree_digest(ds)
    import lib_lora.atomic as atomic

    def fill_config(path, mode="r", *a, **k):  # config.json's bytes go to a disk with no space
        target = DEV_FULL if Path(path).name.startswith(".config.json") else path
        return builtins.open(target, mode, *a, **k)

    monkeypatch.setattr(atomic, "open", fill_config, raising=False)
    line = one_sentence(*run_main(train_args(tmp_path, ds), capsys), "config.json", "disk is full")
    assert "free some disk space" in line
    assert tree_digest(ds) == before and not (tmp_path / "out" / "msg.safetensors").exists()


@needs_dev_full
def test_full_disk_while_saving_the_state(tmp_path, capsys, monkeypatch):
    ds = make_dataset(tmp_path / "data")
    patch_torch_save(monkeypatch, full_disk(torch.save))  # torch's own error: RuntimeError, inline_container.cc
    line = one_sentence(*run_main(train_args(tmp_path, ds, "--state-every-n-steps", "1"), capsys), "state")
    assert "full" in line and "resumes" in line


@needs_dev_full
def test_full_disk_while_exporting(tmp_path, capsys, monkeypatch):
    ds = make_dataset(tmp_path / "data")
    real = safetensors.torch.save_file

    def fill_lora(tensors, f, metadata=None):  # only the final LoRA meets the full disk
        if Path(f).name.startswith(".msg.safetensors"):
            return full_disk(real)(tensors, f, metadata=metadata)
        return real(tensors, f, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fill_lora)
    one_sentence(*run_main(train_args(tmp_path, ds), capsys), "msg.safetensors", "disk is full")
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # no partial LoRA where the WebUI looks


# ---- folders that cannot take the result, found before training -------------------------------


def test_unwritable_output_folder_is_found_before_the_model_loads(tmp_path, capsys, readonly_dir):
    ds = make_dataset(tmp_path / "data")
    out = readonly_dir(tmp_path / "loras")
    args = train_args(tmp_path, ds)
    args[args.index("--output-dir") + 1] = str(out)
    rc, output = run_main(args, capsys)
    one_sentence(rc, output, str(out), "nothing was trained yet")
    assert "Loading the base model" not in output and not (tmp_path / "runs" / "msg" / "config.json").exists()


def test_unwritable_run_folder_is_found_before_the_model_loads(tmp_path, capsys, readonly_dir):
    ds = make_dataset(tmp_path / "data")
    runs = readonly_dir(tmp_path / "runs")
    args = train_args(tmp_path, ds)
    args[args.index("--run-dir") + 1] = str(runs / "msg")
    rc, output = run_main(args, capsys)
    one_sentence(rc, output, "runs", "nothing was trained yet")
    assert "Loading the base model" not in output


@pytest.fixture()
def readonly_dir():
    """A folder nobody may write to, also for root (who ignores permission bits): a read-only
    bind mount where this process may mount, else permission bits for a normal user."""
    mounted: list[Path] = []

    def make(path: Path) -> Path:
        path.mkdir(parents=True)
        if os.geteuid() != 0:
            path.chmod(0o555)
            return path
        ok = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
        if ok:
            mounted.append(path)
            ok = subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True).returncode == 0
        if not ok:
            pytest.skip("running as root without permission to mount a read-only folder")
        return path

    yield make
    for p in mounted:
        subprocess.run(["umount", str(p)], capture_output=True)


# ---- absurd repeats, bounded before the model loads ----------------------------------------------


def test_huge_repeat_count_is_refused_before_the_model_loads(tmp_path, capsys):
    ds = make_dataset(tmp_path / "data")
    (ds / "5_tok").rename(ds / "99999999999999_x")
    before = tree_digest(ds)
    rc, output = run_main(train_args(tmp_path, ds), capsys)
    one_sentence(rc, output, "99999999999999_x", "smaller number")
    assert "Loading the base model" not in output
    assert tree_digest(ds) == before


# ---- prepare: a symlink loop is one skipped file, not the end of the run --------------------------


def photos(folder: Path, n: int = 2) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 255, (80, 80, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"p{i}.png")
    return folder


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="needs symbolic links")
def test_symlink_loop_in_the_photo_folder_is_skipped_with_a_reason(tmp_path, capsys):
    src = photos(tmp_path / "photos")
    (src / "loop.png").symlink_to("loop.png")  # points at itself
    (src / "a.jpg").symlink_to("b.jpg")
    (src / "b.jpg").symlink_to("a.jpg")  # two links pointing at each other
    rc, output = run_main(["prepare", str(src), "--name", "loops", "--out", str(tmp_path / "work"), "--size", "64",
                           "--crop", "center"], capsys)  # fmt: skip
    assert rc == 0 and "Traceback" not in output, output[-3000:]
    for name in ("loop.png", "a.jpg", "b.jpg"):
        hits = [ln for ln in output.splitlines() if ln.startswith(f"  {name}: ")]
        assert len(hits) == 1 and "symbolic link" in hits[0], (name, output)
    made = sorted(p.name for p in (tmp_path / "work" / "loops").rglob("*.png") if "masks" not in p.parts)
    assert made == ["p0.png", "p1.png"]
    assert all((src / f"p{i}.png").is_file() for i in range(2)) and (src / "loop.png").is_symlink()


# ---- base models that are not what they claim -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_weights() -> dict:
    from lib_lora.training.tiny_model import ensure_tiny_checkpoint

    return safetensors.torch.load_file(str(ensure_tiny_checkpoint()))


@pytest.mark.parametrize("missing", ["input_blocks.1.0.out_layers.3.weight", "attn2.to_k.weight"])
def test_base_model_missing_unet_weights(tmp_path, capsys, tiny_weights, missing):
    ds = make_dataset(tmp_path / "data")
    model = tmp_path / "partial.safetensors"
    safetensors.torch.save_file({k: v for k, v in tiny_weights.items()
                                 if not (k.startswith("model.diffusion_model.") and k.endswith(missing))}, str(model))
    before = tree_digest(tmp_path)
    rc, output = run_main(train_args(tmp_path, ds, "--base-model", str(model)), capsys)
    one_sentence(rc, output, "partial.safetensors", "download it again")
    assert {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith("runs")} == before


@pytest.mark.parametrize("config_text", [None, "{not json", "[1, 2]"])
def test_diffusers_folder_without_a_usable_unet_config(tmp_path, capsys, config_text):
    ds = make_dataset(tmp_path / "data")
    model = tmp_path / "sd15-diffusers"
    for sub in ("unet", "vae", "text_encoder", "tokenizer"):
        (model / sub).mkdir(parents=True)
    if config_text is not None:
        (model / "unet" / "config.json").write_text(config_text, encoding="utf-8")
    rc, output = run_main(train_args(tmp_path, ds, "--base-model", str(model)), capsys)
    one_sentence(rc, output, "unet/config.json", "download it again")


# ---- paths over the system's length limit (Errno 36), as real processes -------------------------


def test_overlong_paths_in_train_prepare_and_tags(tmp_path, capsys):
    ds = make_dataset(tmp_path / "data")
    src = photos(tmp_path / "photos")
    before = {**tree_digest(ds), **{f"photos/{k}": v for k, v in tree_digest(src).items()}}
    long_ds = str(tmp_path / "data" / TOO_LONG)
    cases = {  # the first as a real process, the rest through the same main() in this one (faster)
        "train dataset": train_args(tmp_path, Path(long_ds)),
        "train output": [*train_args(tmp_path, ds), "--output-dir", str(tmp_path / TOO_LONG)],
        "prepare source": ["prepare", str(tmp_path / TOO_LONG), "--name", "x", "--out", str(tmp_path / "work")],
        "prepare out": ["prepare", str(src), "--name", "x", "--out", str(tmp_path / TOO_LONG), "--size", "64"],
        "tags folder": ["tags", long_ds, "--frequencies"],
        "tags aliases": ["tags", str(ds), "--aliases-file", str(tmp_path / f"{TOO_LONG}.csv"), "--dry-run"],
    }
    for i, (what, args) in enumerate(cases.items()):
        rc, output = run_process(args, tmp_path) if i == 0 else run_main(args, capsys)
        line = one_sentence(rc, output)
        assert "longer than this system allows" in line or "does not exist" in line, (what, line)
        assert len(line) < 400, (what, line)  # the over-long part is shortened, the sentence stays readable
    assert {**tree_digest(ds), **{f"photos/{k}": v for k, v in tree_digest(src).items()}} == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---- each bad file is reported once in train's output --------------------------------------------


def test_each_bad_file_is_printed_once_by_train(tmp_path):
    ds = make_dataset(tmp_path / "data", n=3)
    sub = ds / "5_tok"
    (sub / "empty.png").write_bytes(b"")  # refused at the scan (its header)
    (sub / "cut.png").write_bytes((sub / "img0.png").read_bytes()[:300])  # refused when its latent is cached
    (sub / "img1.txt").write_bytes(b"\xff\xfe\x00x")  # a caption that is not UTF-8
    before = tree_digest(ds)
    rc, output = run_process([*train_args(tmp_path, ds), "--log-every-n-steps", "1"], tmp_path)
    assert rc == 0 and "Traceback" not in output, output[-3000:]
    for name in ("empty.png", "cut.png", "img1.png"):
        assert output.count(str(sub / name)) == 1, (name, output)
    assert tree_digest(ds) == before


# ---- the page's API: values of the wrong kind, 100k characters, over-long paths ------------------


@pytest.fixture()
def page(tmp_path):
    from lib_lora.hosts.standalone import StandaloneHost
    from lib_lora.ui.app import build_app

    host = StandaloneHost(output_dir=tmp_path / "loras", work_dir=tmp_path / "work", device="cpu")
    return build_app(host)


WRONG = ["x", 7, 1.5, [1, "a"], {"a": 1}, True, None, "1e999", "a" * 100_000]  # what a client may send as JSON


def test_every_handler_answers_values_of_the_wrong_kind(page, tmp_path):
    """Gradio's API lets a client send any JSON value to any input; each handler, given one such
    value in one input and the defaults elsewhere, answers (a message) instead of raising."""
    import inspect
    import itertools

    import gradio as gr

    before = tree_digest(tmp_path)
    raised, calls = [], 0
    for bf in page.fns.values() if isinstance(page.fns, dict) else page.fns:  # a dict in gradio 4
        if bf.fn is None or any(p.annotation is gr.SelectData or "SelectData" in str(p.annotation)
                                for p in inspect.signature(bf.fn).parameters.values()):
            continue  # select events carry gradio's own event object, not client values
        comps = [page.blocks[c] if isinstance(c, int) else c for c in bf.inputs]
        defaults = [getattr(c, "value", None) for c in comps]
        for j, comp in enumerate(comps):
            if isinstance(comp, gr.State):  # server-side: a client cannot send it
                continue
            for value in WRONG:
                args = [*defaults[:j], value, *defaults[j + 1:]]
                calls += 1
                try:
                    out = bf.fn(*args)
                    if inspect.isgenerator(out):
                        list(itertools.islice(out, 5))
                except Exception as err:  # noqa: BLE001 - the finding is what was raised
                    raised.append((bf.fn.__qualname__, getattr(comp, "label", ""), repr(value)[:20], repr(err)[:120]))
    assert calls > 500 and raised == []  # every tab's inputs were tried
    # Nothing was written by a refused request, but for the page's memory of the values a user
    # acted with (kept even when the action is refused, so a reload shows what was typed).
    from lib_lora.ui.memory import FILE_NAME

    # Save preset takes any text that is a valid name ("x", "1e999") as the preset's name and
    # writes the form's recipe under it: that is the button's job, not a refused request.
    written = {k: v for k, v in tree_digest(tmp_path).items()
               if k != f"work/{FILE_NAME}" and not k.startswith("work/presets/")}
    assert written == before


def test_overlong_folder_in_the_page_gets_one_sentence(tmp_path):
    from lib_lora.hosts.standalone import StandaloneHost
    from lib_lora.ui import tab_tag
    from lib_lora.ui.context import UIContext

    ctx = UIContext(host=StandaloneHost(output_dir=tmp_path / "loras", work_dir=tmp_path / "work", device="cpu"))
    status = tab_tag.show_folder(ctx, str(tmp_path / TOO_LONG))[0]
    assert "longer than this system allows" in status and "Traceback" not in status
    assert status.count(". ") == 0 and len(status) < 600  # one sentence, the path shortened


@needs_dev_full
def test_a_full_disk_during_a_page_job_is_one_sentence():
    from lib_lora.ui.jobs import JobRunner

    def work(progress):
        with open(DEV_FULL, "wb") as fh:  # the kernel's ENOSPC when the bytes are flushed
            fh.write(b"\0" * 10_000)

    runner = JobRunner()
    job = runner.start("Train", work)
    job.finished.wait(30)
    assert job.error is not None and "disk is full" in job.error and "OSError" not in job.error, job.error


def test_every_form_field_answers_values_of_the_wrong_kind(tmp_path):
    """The tabs turn their controls' values into configs through forms.collect: a wrong value in
    any one field of any form is a UserError naming the field (or a valid config), nothing else."""
    from lib_lora import config
    from lib_lora.errors import UserError
    from lib_lora.ui import forms
    from lib_lora.ui.paths import FolderPolicy

    # A restricted policy, as beyond loopback, so the path fields' own checks see each value too.
    policy = FolderPolicy.limited([tmp_path])
    tried = 0
    for cls in (config.TrainConfig, config.PrepareConfig, config.TagConfig):
        names = [f.name for f in forms.fields(cls)]
        defaults = forms.values_of(cls(), names)
        for j, name in enumerate(names):
            for value in WRONG:
                tried += 1
                try:
                    forms.collect(cls, names, [*defaults[:j], value, *defaults[j + 1:]], policy=policy)
                except UserError as err:
                    assert "\n" not in str(err) and len(str(err)) < 400, (cls.__name__, name, str(err)[:200])
    assert tried > 500
