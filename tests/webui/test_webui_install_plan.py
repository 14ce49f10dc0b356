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


# Forge: its requirements_versions.txt (read from Forge's source into forge_facts.json) names
# what it pins; a Forge venv holds those at their versions, and torch from its launcher.
FORGE_PINS = __import__("json").loads((Path(__file__).parent / "forge_facts.json").read_text(encoding="utf-8"))[
    "requirements_versions"]
FORGE_VENV = {**{name: version for name, version in FORGE_PINS.items() if version}, "torch": "2.3.1+cu121",
              "torchvision": "0.18.1+cu121", "opencv-python": "4.10.0.84"}


def test_forges_pins_are_never_planned_and_are_held_by_the_constraints():
    host = list(reqs.host_pins("\n".join(f"{n}=={v}" if v else n for n, v in FORGE_PINS.items())))
    assert {"gradio", "transformers", "diffusers", "peft", "pydantic", "huggingface-hub", "tqdm", "torch"} <= set(host)
    names = planned_names(reqs.plan(FORGE_VENV, host))
    assert names and not names & {reqs.canonical(n) for n in host}
    # Forge's own packages are Forge's even when missing or odd: diffusers (pinned 0.31.0) is never ours to install
    odd = {k: v for k, v in FORGE_VENV.items() if k not in ("diffusers", "tqdm")}
    assert not planned_names(reqs.plan(odd, host)) & {"diffusers", "tqdm"}
    assert "diffusers" in planned_names(reqs.plan(odd))  # (in A1111, which does not pin it, it is ours)
    lines = set(reqs.pin_constraints(FORGE_VENV, host).split())
    assert {"gradio==4.40.0", "transformers==4.46.1", "diffusers==0.31.0", "pydantic==2.8.2", "peft==0.13.2",
            "huggingface-hub==0.26.2", "tqdm==4.66.1", "torch==2.3.1+cu121", "scikit-image==0.21.0"} <= lines


def test_install_py_reads_its_hosts_requirements_file(tmp_path, monkeypatch):
    import importlib.util
    import shutil

    ext = tmp_path / "webui" / "extensions" / "sd-fast-lora"
    ext.mkdir(parents=True)
    shutil.copy(ROOT / "install.py", ext / "install.py")
    (tmp_path / "webui" / "requirements_versions.txt").write_text(
        "\n".join(f"{n}=={v}" if v else n for n, v in FORGE_PINS.items()) + "\n", encoding="utf-8")
    spec = importlib.util.spec_from_file_location("fast_lora_install_forge", ext / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    def pip(args, desc):
        constraints = args[args.index("-c") + 1]
        calls.append((args, Path(constraints).read_text(encoding="utf-8").split()))

    monkeypatch.setattr(module, "_pip", pip)
    venv = {k: v for k, v in FORGE_VENV.items() if k != "diffusers"}
    monkeypatch.setattr(module.reqs, "installed_distributions", lambda names: dict(venv))
    assert module.main() == 0
    assert calls and not any("diffusers" in " ".join(args) for args, _ in calls)
    for _, constraints in calls:
        assert {"gradio==4.40.0", "transformers==4.46.1", "pydantic==2.8.2", "tqdm==4.66.1"} <= set(constraints)
