"""What the extension needs inside an A1111 venv, and the pip steps that add only what is missing.

Pure standard library: `install.py` imports it at every WebUI start (it must be fast and must
not import torch), and the tab imports it to explain what is still missing.

A1111 and Forge re-install their own pins at every launch, so we never plan a change to them:
the packages in `HOST_PINNED`, and every package the host's `requirements_versions.txt` names
(Forge's pins gradio 4.x, transformers 4.46.1, diffusers 0.31.0, peft, pydantic...), are never
installed, upgraded or downgraded, and every pip call gets a constraints file holding their
installed versions, so pip fails instead of replacing them.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# The host's pins (REFERENCE §3). Planned never; constrained to their installed versions.
HOST_PINNED = (
    "torch", "torchvision", "torchaudio", "xformers", "gradio", "transformers", "accelerate",
    "safetensors", "numpy", "pillow", "protobuf", "tokenizers", "huggingface-hub",
)


@dataclass(frozen=True)
class Requirement:
    name: str  # distribution name as pip knows it
    spec: str  # what we install: a pip requirement string
    lo: str | None = None  # an installed version below this (or >= hi) counts as missing
    hi: str | None = None
    no_deps: bool = False  # install with --no-deps
    alternatives: tuple[str, ...] = ()  # other distributions that provide the same module
    # The alternatives write the same files (opencv-*: cv2/): never install one beside another,
    # whatever its version; uninstalling either later would break the module for both.
    exclusive: bool = False
    why: str = ""


# Every wheel that installs the `cv2` package.
OPENCV_DISTRIBUTIONS = ("opencv-python-headless", "opencv-python", "opencv-contrib-python",
                        "opencv-contrib-python-headless")
# rembg 2.0.69's requirements (its metadata) less numpy and pillow (the host's) and OpenCV.
REMBG_DEPENDENCIES = ("jsonschema", "pooch", "pymatting", "scikit-image", "scipy", "tqdm")

# Versions measured to work beside A1111 v1.10's pins (REFERENCE §3).
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("diffusers", "diffusers==0.31.0", lo="0.31", hi="0.32", why="model loading outside the WebUI"),
    Requirement("onnxruntime", "onnxruntime>=1.23,<1.27", lo="1.17",
                alternatives=("onnxruntime-gpu", "onnxruntime-directml"), why="taggers and background removal"),
    # The WebUI has opencv-python already (facexlib's requirement); only a venv without any gets ours.
    Requirement("opencv-python-headless", "opencv-python-headless==4.11.0.86", lo="4", hi="5",
                alternatives=OPENCV_DISTRIBUTIONS[1:], exclusive=True, why="face detection for cropping"),
    # rembg requires opencv-python-headless, a second OpenCV beside the WebUI's: it is installed
    # without its requirements, and those (but OpenCV, above) are listed here.
    Requirement("rembg", "rembg==2.0.69", lo="2.0.60", hi="2.1", no_deps=True, why="background removal"),
    *(Requirement(name, name, why="what rembg needs") for name in REMBG_DEPENDENCIES),
    Requirement("prodigyopt", "prodigyopt==1.1.2", why="the Prodigy optimizer"),
    # 3.4 is the last line for torch 2.1 (4.x registers torch.library custom ops, torch >= 2.4);
    # its requirements are torch (the host's), einops, toml and tqdm.
    Requirement("lycoris-lora", "lycoris-lora==3.4.0", lo="3.4", hi="4",
                why="the LoCon, LoHa, LoKr and DoRA network types"),
    Requirement("dadaptation", "dadaptation==3.2", why="the D-Adaptation optimizer (learning-rate probe)"),
    Requirement("bitsandbytes", "bitsandbytes", why="the AdamW8bit optimizer"),
    Requirement("tensorboard", "tensorboard", why="training logs"),
    Requirement("matplotlib", "matplotlib", why="loss and learning-rate charts"),
    Requirement("einops", "einops", why="the WebUI's model classes"),
    Requirement("omegaconf", "omegaconf", why="the WebUI's model configs"),
    # Its own requirements pull `onnx`, which does not build under protobuf 3.20 and is unused.
    Requirement("deepdanbooru-onnx", "deepdanbooru-onnx==0.0.8", no_deps=True, why="the DeepDanbooru tagger"),
    # Only its BPE vocabulary file is read (the CLIP tokenizer offline); the WebUI ships it.
    Requirement("open-clip-torch", "open-clip-torch==2.20.0", no_deps=True, why="the CLIP tokenizer vocabulary"),
)


@dataclass(frozen=True)
class Step:
    """One pip call: `pip install [--no-deps] <specs>` (always with the host-pin constraints)."""

    specs: tuple[str, ...]
    no_deps: bool
    names: tuple[str, ...]

    def pip_args(self, constraints_file: str | None = None) -> list[str]:
        args = ["install"]
        if self.no_deps:
            args.append("--no-deps")
        if constraints_file:
            args += ["-c", constraints_file]
        return args + list(self.specs)


def _quote(arg: str) -> str:
    # A1111's run_pip hands one string to the shell (cmd.exe on Windows, sh elsewhere), and a
    # command shown to copy goes to one too: double quotes work in both, and specs such as
    # onnxruntime>=1.23,<1.27 must not become redirections.
    return f'"{arg}"' if any(c in arg for c in ' <>|&^;()') else arg


def command_line(args: list[str]) -> str:
    """`args` as one shell command line, safe for cmd.exe and sh."""
    return " ".join(_quote(a) for a in args)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def satisfied(req: Requirement, version: str | None) -> bool:
    """Whether an installed `version` (None: not installed) of `req` is usable."""
    if version is None:
        return False
    v = _version_tuple(version)
    if req.lo is not None and v < _version_tuple(req.lo):
        return False
    if req.hi is not None and v >= _version_tuple(req.hi):
        return False
    return True


def blocked(installed: Mapping[str, str], host: Iterable[str] = ()) -> list[tuple[Requirement, str, str]]:
    """(requirement, distribution, version) for each missing exclusive requirement that is not
    installed because a distribution writing the same module is present, at a version that
    does not do (OpenCV 5 has no CascadeClassifier): the user replaces it, we never add a second."""
    have = {canonical(k): v for k, v in installed.items()}
    out = []
    for req in missing(installed, host):
        if req.exclusive:
            present = [n for n in (req.name, *req.alternatives) if canonical(n) in have]
            if present:
                out.append((req, present[0], have[canonical(present[0])]))
    return out


def host_pins(text: str) -> dict[str, str]:
    """{canonical name: pinned version, or '' when unversioned} of a WebUI's
    requirements_versions.txt (Forge lists `torch` without a version: its launcher installs it)."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([^\s;]+))?", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2) or ""
    return pins


def host_pins_file(extension_dir: str) -> str | None:
    """The host WebUI's requirements_versions.txt for an extension installed under
    <webui>/extensions/<name> (A1111 and Forge keep it at their root); None elsewhere."""
    import os

    parent = os.path.dirname(os.path.abspath(extension_dir))
    if os.path.basename(parent) != "extensions":
        return None
    path = os.path.join(os.path.dirname(parent), "requirements_versions.txt")
    return path if os.path.isfile(path) else None


def _host_owned(host: Iterable[str]) -> set[str]:
    return set(HOST_PINNED) | {canonical(n) for n in host}


def missing(installed: Mapping[str, str], host: Iterable[str] = ()) -> list[Requirement]:
    """The requirements not satisfied by `installed` ({distribution name: version}); `host`: the
    names the host's requirements file pins (never ours to install either)."""
    have = {canonical(k): v for k, v in installed.items()}
    owned = _host_owned(host)
    out = []
    for req in REQUIREMENTS:
        if canonical(req.name) in owned:
            continue  # never ours to install, whatever the table says
        candidates = [req.name, *req.alternatives]
        if any(satisfied(req, have.get(canonical(n))) for n in candidates):
            continue
        out.append(req)
    return out


def plan(installed: Mapping[str, str], host: Iterable[str] = ()) -> list[Step]:
    """The pip steps that install exactly what is missing: one call with dependencies, one
    without (`--no-deps` packages). Empty when everything is present. `host`: as in `missing`."""
    host = tuple(host)
    held_back = {req.name for req, _, _ in blocked(installed, host)}
    todo = [r for r in missing(installed, host) if r.name not in held_back]
    steps = []
    for no_deps in (False, True):
        group = [r for r in todo if r.no_deps == no_deps]
        if group:
            steps.append(Step(tuple(r.spec for r in group), no_deps, tuple(r.name for r in group)))
    return steps


def blocked_message(req: Requirement, dist: str, version: str) -> str:
    """What to do about a requirement held back by `blocked`, in one sentence."""
    return (f"{dist} {version} is installed, but {req.why} needs OpenCV 4 ({req.lo} <= version < {req.hi}); "
            f"Fast LoRA does not install a second OpenCV beside it: replace it by hand with "
            f"{command_line(['pip', 'install', f'{dist}>={req.lo},<{req.hi}'])}.")


def pin_constraints(installed: Mapping[str, str], host: Iterable[str] = ()) -> str:
    """A pip constraints file's text holding the installed host pins (HOST_PINNED, and `host`:
    the names the host's requirements file pins) at their exact installed versions."""
    have = {canonical(k): v for k, v in installed.items()}
    names = list(HOST_PINNED) + sorted({canonical(n) for n in host} - set(HOST_PINNED))
    lines = [f"{name}=={have[name]}" for name in names if name in have]
    return "\n".join(lines) + "\n"


def installed_distributions(names: Iterable[str]) -> dict[str, str]:
    """{canonical name: version} for those of `names` this interpreter has installed."""
    out: dict[str, str] = {}
    for name in names:
        try:
            out[canonical(name)] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def relevant_names(host: Iterable[str] = ()) -> set[str]:
    names = _host_owned(host)
    for req in REQUIREMENTS:
        names.add(canonical(req.name))
        names.update(canonical(a) for a in req.alternatives)
    return names


def missing_now() -> list[Requirement]:
    """What this interpreter still lacks (the tab shows it when install.py could not finish)."""
    return missing(installed_distributions(relevant_names()))
