"""install.py's plan: exactly the missing packages, never one the WebUI pins."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lib_lora.hosts import webui_requirements as reqs

ROOT = Path(__file__).resolve().parents[2]

# What an A1111 v1.10.1 venv holds after its own launch (its pins), without our packages.
A1111_VENV = {
    "torch": "2.1.2+cu121", "torchvision": "0.16.2+cu121", "xformers": "0.0.23.post1",
    "gradio": "3.41.2", "transformers": "4.30.2", "accelerate": "0.21.0", "safetensors": "0.4.2",
    "numpy": "1.26.2", "Pillow": "9.5.0", "protobuf": "3.20.0", "open-clip-torch": "2.20.0",
    "einops": "0.4.1", "omegaconf": "2.2.3", "tokenizers": "0.13.3", "huggingface_hub": "0.25.2",
    "scikit-image": "0.21.0",  # requirements_versions.txt
    "opencv-python": "4.10.0.84",  # facexlib==0.3.0 (requirements_versions.txt) requires opencv-python
}
EVERYTHING = {**A1111_VENV, **{r.name: r.spec.split("==")[-1] if "==" in r.spec else "9.9" for r in reqs.REQUIREMENTS}}


def planned_names(steps: list[reqs.Step]) -> set[str]:
    return {reqs.canonical(n) for s in steps for n in s.names}


def test_fresh_a1111_venv_plans_exactly_the_missing_packages():
    steps = reqs.plan(A1111_VENV)
    assert planned_names(steps) == {
        "diffusers", "onnxruntime", "rembg", "prodigyopt", "dadaptation", "bitsandbytes", "tensorboard",
        "matplotlib", "deepdanbooru-onnx", "jsonschema", "pooch", "pymatting", "scipy", "tqdm", "lycoris-lora",
    }
    with_deps, no_deps = steps
    assert not with_deps.no_deps and no_deps.no_deps
    assert no_deps.names == ("rembg", "deepdanbooru-onnx")
    assert no_deps.pip_args("c.txt") == ["install", "--no-deps", "-c", "c.txt", "rembg==2.0.69", "deepdanbooru-onnx==0.0.8"]
    assert "diffusers==0.31.0" in with_deps.specs
    # lycoris-lora 3.4.0 requires torch (the host's, held by the constraints), einops, toml and tqdm;
    # 4.x needs torch >= 2.4 (torch.library.custom_op), above A1111 v1.10's torch 2.1.2.
    assert "lycoris-lora==3.4.0" in with_deps.specs
    assert not reqs.satisfied(next(r for r in reqs.REQUIREMENTS if r.name == "lycoris-lora"), "4.1.3")


def test_no_second_opencv_beside_the_webuis():
    """opencv-python and opencv-python-headless both write cv2/: uninstalling one breaks the other.
    rembg requires the headless wheel, so it is installed without its requirements."""
    specs = [spec for step in reqs.plan(A1111_VENV) for spec in step.specs]
    assert not any("opencv" in spec for spec in specs)
    rembg = next(step for step in reqs.plan(A1111_VENV) if "rembg==2.0.69" in step.specs)
    assert rembg.no_deps
    # Every requirement of rembg 2.0.69 but OpenCV is installed (or the host's) another way.
    rembg_requires = {"jsonschema", "numpy", "opencv-python-headless", "pillow", "pooch", "pymatting",
                      "scikit-image", "scipy", "tqdm"}  # its metadata's Requires-Dist, without extras
    covered = {reqs.canonical(r.name) for r in reqs.REQUIREMENTS} | set(reqs.HOST_PINNED)
    assert rembg_requires <= covered
    # A venv with no OpenCV at all gets the headless wheel, once.
    bare = {k: v for k, v in A1111_VENV.items() if k != "opencv-python"}
    assert [s for step in reqs.plan(bare) for s in step.specs if "opencv" in s] == ["opencv-python-headless==4.11.0.86"]
    # Any OpenCV distribution, at any version, holds the headless wheel back.
    for dist in reqs.OPENCV_DISTRIBUTIONS[1:]:
        for version in ("4.8.1.78", "5.0.0"):
            env = {**bare, dist: version}
            assert not any("opencv" in s for step in reqs.plan(env) for s in step.specs), (dist, version)


def test_nothing_planned_when_everything_is_present():
    assert reqs.plan(EVERYTHING) == []


def test_pinned_packages_are_never_planned_even_when_missing_or_odd():
    bare = {}  # nothing at all installed, not even torch
    names = planned_names(reqs.plan(bare))
    assert not names & set(reqs.HOST_PINNED)
    odd = {**EVERYTHING, "numpy": "2.1.0", "torch": "1.13.0", "Pillow": "10.0.0"}
    assert reqs.plan(odd) == []


def test_wrong_versions_of_our_own_packages_count_as_missing():
    steps = reqs.plan({**EVERYTHING, "diffusers": "0.32.2", "rembg": "2.0.50"})
    assert planned_names(steps) == {"diffusers", "rembg"}


def test_alternative_distributions_satisfy_a_requirement():
    env = {k: v for k, v in EVERYTHING.items() if k not in ("onnxruntime", "opencv-python-headless")}
    env.update({"onnxruntime-gpu": "1.24.1", "opencv-python": "4.10.0.84"})
    assert reqs.plan(env) == []
    env["opencv-python"] = "5.0.0"  # OpenCV 5 lost CascadeClassifier: said, but no second OpenCV installed
    assert reqs.plan(env) == []
    [(req, dist, version)] = reqs.blocked(env)
    assert (req.name, dist, version) == ("opencv-python-headless", "opencv-python", "5.0.0")
    assert '"opencv-python>=4,<5"' in reqs.blocked_message(req, dist, version)


def test_constraints_hold_the_installed_pins_exactly():
    text = reqs.pin_constraints(A1111_VENV)
    lines = set(text.split())
    assert {"torch==2.1.2+cu121", "numpy==1.26.2", "pillow==9.5.0", "protobuf==3.20.0", "gradio==3.41.2"} <= lines
    assert not any(line.startswith("diffusers") for line in lines)


def test_install_py_is_silent_when_everything_is_present():
    # This venv carries every requirement, so the real script must plan nothing and print nothing.
    assert reqs.missing_now() == []
    out = subprocess.run([sys.executable, str(ROOT / "install.py")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout == "" and out.stderr == ""


def test_install_failure_names_the_package_and_the_command(tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("fast_lora_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    def failing_pip(args, desc):
        calls.append(args)
        raise RuntimeError("Couldn't install\nERROR: No matching distribution found for rembg==2.0.69")

    monkeypatch.setattr(module, "_pip", failing_pip)
    monkeypatch.setattr(module.reqs, "installed_distributions", lambda names: dict(A1111_VENV))
    assert module.main() == 1
    err = capsys.readouterr().err
    assert "could not install diffusers" in err and "rembg" in err
    assert "-m pip install --no-deps rembg==2.0.69 deepdanbooru-onnx==0.0.8" in err
    assert "No matching distribution" in err
    assert all("-c" in args for args in calls)  # every pip call carries the host-pin constraints


def test_pip_command_line_is_safe_for_cmd_and_sh():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fast_lora_install_q", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    line = module.command_line(["install", "-c", "C:/Users/John Doe/pins.txt", "onnxruntime>=1.23,<1.27", "rembg==2.0.69"])
    assert line == 'install -c "C:/Users/John Doe/pins.txt" "onnxruntime>=1.23,<1.27" rembg==2.0.69'


def test_tab_banner_commands_are_quoted_for_the_shell(monkeypatch):
    from lib_lora.hosts import webui_app

    monkeypatch.setattr(reqs, "installed_distributions", lambda names: dict(A1111_VENV))
    banner = webui_app.missing_banner()
    assert "Fast LoRA is missing diffusers" in banner and "deepdanbooru-onnx" in banner
    assert '"onnxruntime>=1.23,<1.27"' in banner and " onnxruntime>=1.23" not in banner
    assert "-m pip install --no-deps rembg==2.0.69 deepdanbooru-onnx==0.0.8" in banner
    without_opencv = {k: v for k, v in EVERYTHING.items() if "opencv" not in k}
    monkeypatch.setattr(reqs, "installed_distributions", lambda names: {**without_opencv, "opencv-python": "5.0.0"})
    assert "opencv-python 5.0.0 is installed" in webui_app.missing_banner()
    monkeypatch.setattr(reqs, "installed_distributions", lambda names: dict(EVERYTHING))
    assert webui_app.missing_banner() == ""
