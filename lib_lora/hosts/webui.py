"""The AUTOMATIC1111 host: the only module that imports the WebUI's `modules` (and `networks`).

It trains on the checkpoint the WebUI has loaded, in place (`LdmBackbone` for SD1.5's ldm
model, `SgmBackbone` for SDXL's sgm model), one job at a time
under the WebUI's queue lock, reports to the page's progress bar, obeys its Interrupt button,
and writes the LoRA where `<lora:name:1>` finds it at once. The WebUI's model is left exactly
as it was found, also after an error or an interrupt (`training_state`).

`modules` is imported inside functions: this file is importable (and testable against a
small fake `modules` package) without a WebUI.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import importlib
import logging
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lib_lora.errors import Cancelled, UserError
from lib_lora.hosts.forge_backbone import (
    ForgeBackbone,
    check_forge_trainable,
    forge_backbone,
    forge_training_state,
    is_forge_model,
    is_forge_sdxl,
)
from lib_lora.hosts.ldm_backbone import LdmBackbone, preserve_model_state
from lib_lora.hosts.sgm_backbone import TE2_NOT_TRAINED, SgmBackbone, is_sgm_sdxl
from lib_lora.names import validate_name
from lib_lora.training.card import write_card, write_preview  # noqa: F401 - also this module's API
from lib_lora.training.family import SD15, SDXL, ModelFamily

if TYPE_CHECKING:
    from lib_lora.ui.paths import FolderPolicy

log = logging.getLogger(__name__)

SETTINGS_SECTION = ("fast_lora", "Fast LoRA")
API_PREFIX = "/fastlora/v1"
GRID_WEIGHTS = (0.0, 0.5, 0.75, 1.0)


def a1111(name: str) -> Any:
    """`modules.<name>` of the running WebUI."""
    return importlib.import_module(f"modules.{name}")


def lora_extension() -> Any | None:
    """The built-in Lora extension's `networks` module (None when that extension is disabled)."""
    return sys.modules.get("networks")


def opt(key: str, default: Any) -> Any:
    return getattr(a1111("shared").opts, key, default)


# --------------------------------------------------------------------------------------------
# Who can reach the page, and what its requests may name

ROOTS_ENV = "FAST_LORA_ROOTS"  # extra folders, os.pathsep-separated; read from the environment,
# which a remote visitor cannot change (the WebUI's settings page they can)


def listens_beyond_loopback() -> bool:
    """Whether other machines can reach the WebUI: --share, --listen, --ngrok, or a --server-name
    that is not a loopback address (A1111's `webui_is_non_local`, less a loopback name)."""
    from lib_lora.ui.serving import is_loopback

    cmd = a1111("shared").cmd_opts
    server_name = getattr(cmd, "server_name", None)
    return bool(getattr(cmd, "share", False) or getattr(cmd, "listen", False) or getattr(cmd, "ngrok", None)
                or (server_name and not is_loopback(server_name)))


def api_credentials() -> dict[str, str] | None:
    """--api-auth "user:password[,user2:password2]", as the WebUI's own API reads it; None when
    it is not given (an entry without ':' grants nothing, so a malformed one locks the routes)."""
    text = getattr(a1111("shared").cmd_opts, "api_auth", None) or ""
    if not text:
        return None
    creds = {}
    for item in text.split(","):
        user, sep, password = item.partition(":")
        if sep:
            creds[user] = password
    return creds


# --------------------------------------------------------------------------------------------
# What can be trained here


def check_trainable(sd_model: Any) -> None:
    """Raise a UserError saying why the loaded model cannot be trained on here, if it cannot."""
    shared = a1111("shared")
    if sd_model is not None and is_forge_model(sd_model):
        check_forge_trainable(sd_model)  # Forge's memory manager replaces --lowvram / --medvram
        return
    if getattr(shared.cmd_opts, "lowvram", False):
        raise UserError(
            "Training is not possible with --lowvram (the WebUI's own training refuses it too); "
            "restart the WebUI without it, or with --medvram."
        )
    if sd_model is None:
        raise UserError("No checkpoint is loaded: choose an SD1.5 or SDXL checkpoint at the top of the page first.")
    if getattr(sd_model, "is_sd2", False) or getattr(sd_model, "is_sd3", False):
        raise UserError("The loaded checkpoint is SD2 or SD3; Fast LoRA trains SD1.5 and SDXL LoRAs: load one of those.")
    if getattr(sd_model, "is_sdxl_inpaint", False):
        raise UserError("The loaded checkpoint is an SDXL inpainting model; load an SDXL base model (or an SD1.5 one).")
    if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "conditioner"):
        if not is_sgm_sdxl(sd_model) or not hasattr(getattr(sd_model, "model", None), "diffusion_model"):
            raise UserError("The loaded checkpoint is an SDXL refiner or another SDXL variant without SDXL base's "
                            "two text encoders; load an SDXL base model (or an SD1.5 one).")
        return
    if not hasattr(getattr(sd_model, "model", None), "diffusion_model"):
        raise UserError("The loaded checkpoint has no SD1.5 U-Net; load an SD1.5 checkpoint.")


def checkpoint_identity(sd_model: Any) -> tuple[str, str]:
    """(file name, sha256 or '') of the loaded checkpoint, for the LoRA's metadata."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    if info is None:
        return "", ""
    name = Path(getattr(info, "filename", "") or getattr(info, "name", "")).name
    return name, getattr(info, "sha256", None) or ""


# --------------------------------------------------------------------------------------------
# Host state: everything training touches, given back exactly


@dataclasses.dataclass
class AppliedLoras:
    loaded: list  # networks.loaded_networks as it was
    modules: list  # modules whose weights held LoRA deltas


def take_back_applied_loras(sd_model: Any) -> AppliedLoras | None:
    """Put back the original weights where the WebUI added LoRA deltas in place, and empty
    `loaded_networks` so its patched forwards do not re-apply them during training."""
    nets = lora_extension()
    if nets is None:
        return None
    touched = [m for m in sd_model.modules() if getattr(m, "network_current_names", ())]
    with torch.no_grad():
        for m in touched:
            nets.network_restore_weights_from_backup(m)
            m.network_current_names = ()
    state = AppliedLoras(list(nets.loaded_networks), touched)
    nets.loaded_networks.clear()
    return state


def give_back_applied_loras(state: AppliedLoras | None) -> None:
    """Re-apply the deltas exactly as the WebUI computes them (same backup, same code)."""
    nets = lora_extension()
    if state is None or nets is None:
        return
    nets.loaded_networks[:] = state.loaded
    try:
        with torch.no_grad():
            for m in state.modules:
                nets.network_apply_weights(m)
    except Exception:  # the WebUI re-applies them itself at the next forward
        log.exception("Fast LoRA: re-applying the WebUI's LoRA weights failed; they are re-applied on next use")
        for m in state.modules:
            with contextlib.suppress(Exception):
                nets.network_restore_weights_from_backup(m)
            m.network_current_names = ()


class Placement:
    """Device placement of the model's three parts, and the --medvram hooks' bookkeeping."""

    PARTS = ("model", "cond_stage_model", "conditioner", "first_stage_model")  # conditioner: sgm (SDXL)

    def __init__(self, sd_model: Any, device: torch.device):
        self.sd_model = sd_model
        self.device = device
        self.medvram = bool(getattr(sd_model, "lowvram", False))
        self.devices = {p: _device_of(getattr(sd_model, p, None)) for p in self.PARTS}

    def for_training(self) -> None:
        if not self.medvram:
            return
        # --medvram keeps one part on the GPU at a time (forward pre-hooks). We call the U-Net
        # directly, past its hook, so it is placed here; the text encoder's and the VAE's own
        # hooks still move them in when they run (latents are cached before the first step).
        a1111("lowvram").send_everything_to_cpu()
        self.sd_model.model.to(self.device)
        # SDXL: the hook sits on the whole conditioner, while SgmBackbone calls its embedders'
        # parts directly, so the hook never fires: place the text encoders too.
        conditioner = getattr(self.sd_model, "conditioner", None)
        if conditioner is not None:
            conditioner.to(self.device)

    def restore(self) -> None:
        if self.medvram:
            a1111("lowvram").send_everything_to_cpu()
        for part, dev in self.devices.items():
            module = getattr(self.sd_model, part, None)
            if dev is not None and _device_of(module) != dev:
                module.to(dev)


def _device_of(module: Any) -> torch.device | None:
    p = next(iter(module.parameters()), None) if module is not None else None
    return None if p is None else p.device


@contextlib.contextmanager
def training_state(sd_model: Any, device: torch.device) -> Iterator[None]:
    """The WebUI's model ready for in-place LoRA training, and given back exactly afterwards:
    applied LoRA deltas taken out and put back, attention hijacks undone as the WebUI's own
    training does, --medvram placement handled, every parameter frozen, and every hook,
    forward override, flag and requires_grad restored, on success, error or interrupt."""
    check_trainable(sd_model)
    sd_hijack, devices = a1111("sd_hijack"), a1111("devices")
    undo_hijack = not opt("training_xattention_optimizations", False)
    applied = take_back_applied_loras(sd_model)
    placement = Placement(sd_model, device)
    try:
        if undo_hijack:
            sd_hijack.undo_optimizations()
        placement.for_training()
        with preserve_model_state(sd_model):
            yield
    finally:
        try:
            placement.restore()
            if undo_hijack:
                sd_hijack.apply_optimizations()
        finally:
            give_back_applied_loras(applied)
            gc.collect()
            devices.torch_gc()


# --------------------------------------------------------------------------------------------
# Progress on the page's bar, Interrupt from the page's button


class StateProgress:
    """`lib_lora.progress.Progress` over the WebUI's `shared.state`."""

    def __init__(self, state: Any, on_update: Callable[[int, int, str], None] | None = None):
        self.state = state
        self.on_update = on_update
        self.figure = ""  # the latest loss (or the probe's d*lr), shown after the phase's label

    def update(self, done: int, total: int, text: str = "", *, page: bool = True) -> None:
        """Our progress on the tab (`on_update`) and, with `page`, on the WebUI's own bar as its
        job count; `page=False` while the WebUI samples inside the job: its sampler counts its
        steps on that bar (and its console's total) from a job count of 1."""
        if page:
            self.state.job_count = max(int(total), 1)
            self.state.job_no = min(int(done), self.state.job_count)
        if text:
            self.state.textinfo = f"{text} · {self.figure}" if self.figure else text
        if self.on_update is not None:
            self.on_update(done, total, text)

    def cancelled(self) -> bool:
        return bool(self.state.interrupted or getattr(self.state, "stopping_generation", False))

    def cancel(self) -> None:
        """The tab's Stop: the WebUI's Interrupt, so its own generation (Test grid, preview) ends too."""
        interrupt = getattr(self.state, "interrupt", None)
        if callable(interrupt):
            interrupt()
        else:
            self.state.interrupted = True


@dataclasses.dataclass
class JobRecord:
    """What the REST progress route reports."""

    job_id: str = ""
    status: str = "idle"  # idle | queued | running | done | interrupted | error
    title: str = ""
    step: int = 0
    total: int = 0
    text: str = ""
    loss: float | None = None
    lora_path: str = ""
    error: str = ""
    events: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=50))

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "events"}
        d["events"] = list(self.events)
        return d


# --------------------------------------------------------------------------------------------
# The preview image made after a training


@dataclasses.dataclass(frozen=True)
class PreviewSettings:
    enabled: bool = True
    width: int = 512
    height: int = 512
    steps: int = 20
    sampler: str = "Euler a"


def preview_settings() -> PreviewSettings:
    """The Settings' preview options (webui_app.settings_options), bounded as their sliders are."""
    d = PreviewSettings()

    def number(key: str, default: int, lo: int, hi: int) -> int:
        try:
            return max(lo, min(hi, int(opt(key, default))))
        except (TypeError, ValueError):
            return default

    return PreviewSettings(
        enabled=bool(opt("fast_lora_preview", d.enabled)),
        width=number("fast_lora_preview_width", d.width, 64, 2048) // 8 * 8,
        height=number("fast_lora_preview_height", d.height, 64, 2048) // 8 * 8,
        steps=number("fast_lora_preview_steps", d.steps, 1, 150),
        sampler=str(opt("fast_lora_preview_sampler", d.sampler) or d.sampler),
    )


@contextlib.contextmanager
def interrupt_on_cancel(progress: Any, state: Any, total: int, text: str, poll: float = 0.05) -> Iterator[None]:
    """While the WebUI generates: its sampling step on our progress, and our Stop as its Interrupt
    (its samplers poll `state.interrupted`; the tab's Stop only sets our progress's flag)."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(poll):
            if progress.cancelled():
                state.interrupt()
                return
            step = min(int(getattr(state, "sampling_step", 0) or 0), total)
            if isinstance(progress, StateProgress):
                progress.update(step, total, text, page=False)
            else:
                progress.update(step, total, text)

    watcher = threading.Thread(target=watch, name="fast-lora-preview-stop", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


# --------------------------------------------------------------------------------------------
# The host


class WebUIHost:
    """`lib_lora.hosts.base.Host` for AUTOMATIC1111 v1.10 and Forge (its loaded model through
    `ForgeBackbone`; the rest of A1111's `modules` API, which Forge keeps)."""

    name = "webui"

    def __init__(self) -> None:
        self._local = threading.local()
        self._record_lock = threading.Lock()
        self.record = JobRecord()
        self._policy: FolderPolicy | None = None

    @property
    def language(self) -> str:
        """The UI language: Chinese when the WebUI's localization is a zh_* one."""
        loc = str(opt("localization", "None") or "None")
        return "zh" if loc.lower().startswith("zh") else "en"

    @property
    def default_preset(self) -> str:
        """The preset the Train tab opens on: the setting "Default training preset"."""
        return str(opt("fast_lora_preset", "person"))

    # -- places ------------------------------------------------------------------------------
    def lora_dir(self) -> Path:
        shared = a1111("shared")
        folder = getattr(shared.cmd_opts, "lora_dir", None)
        if not folder:
            folder = Path(a1111("paths").models_path) / "Lora"
        return Path(folder)

    def work_dir(self) -> Path:
        configured = opt("fast_lora_work_dir", "")
        if configured:
            return Path(configured).expanduser()
        return Path(a1111("paths").data_path) / "fast_lora"

    def path_policy(self) -> FolderPolicy:
        """The folders the tabs and the REST route may use: any on loopback; beyond it the
        WebUI's model folders, the LoRA and work folders and FAST_LORA_ROOTS. Fixed at the first
        call (the WebUI's start), so a changed work-folder setting cannot widen it until a restart."""
        if self._policy is None:
            from lib_lora.ui.paths import FolderPolicy

            if not listens_beyond_loopback():
                self._policy = FolderPolicy()
            else:
                cmd = a1111("shared").cmd_opts
                # The work folder first: a relative path is taken under it.
                roots = [self.work_dir(), a1111("paths").models_path, self.lora_dir(), getattr(cmd, "ckpt_dir", None),
                         *os.environ.get(ROOTS_ENV, "").split(os.pathsep)]
                self._policy = FolderPolicy.limited([r for r in roots if r])
        return self._policy

    # -- the model ---------------------------------------------------------------------------
    def _loaded_model(self) -> Any:
        try:
            return a1111("sd_models").model_data.sd_model  # never loads one (shared.sd_model may)
        except (ImportError, AttributeError):
            return getattr(a1111("shared"), "sd_model", None)

    def model_family(self) -> ModelFamily:
        """The family of the loaded checkpoint, read without loading or touching it: SDXL for
        an sgm SDXL base model or Forge's SDXL engine, else SD1.5 (no model yet, or one `backbone()` refuses)."""
        sd_model = self._loaded_model()
        return SDXL if sd_model is not None and (is_sgm_sdxl(sd_model) or is_forge_sdxl(sd_model)) else SD15

    def loaded_model_name(self) -> str:
        """The loaded checkpoint's file name, read without loading one ('' when none is loaded or
        it has no file): the base model a run on it records (its step time among them)."""
        sd_model = self._loaded_model()
        return checkpoint_identity(sd_model)[0] if sd_model is not None else ""

    def backbone(self, base_model: str | None = None) -> LdmBackbone | SgmBackbone | ForgeBackbone:
        """The WebUI's loaded checkpoint, trained in place (`base_model` is ignored).

        Inside a job, the first call also readies the model for training (`training_state`)
        and the job's end gives it back exactly, whatever happens in between: so a caller
        that trains with this backbone (our UI, the API, a script) cannot leave it changed."""
        sd_model = a1111("shared").sd_model
        check_trainable(sd_model)
        name, sha = checkpoint_identity(sd_model)
        # The WebUI's CheckpointInfo.hash is its old 8-hex model hash, the one kohya writes as ss_sd_model_hash.
        legacy = str(getattr(getattr(sd_model, "sd_checkpoint_info", None), "hash", "") or "")
        legacy = "" if legacy == "NOFILE" else legacy
        forge = is_forge_model(sd_model)
        if forge:  # on Forge's own device (its memory manager's), not modules.devices'
            backbone = forge_backbone(sd_model, model_name=name, model_hash=sha, model_legacy_hash=legacy)
        else:
            kind = SgmBackbone if is_sgm_sdxl(sd_model) else LdmBackbone
            backbone = kind(sd_model, model_name=name, model_hash=sha, device=a1111("devices").device,
                            model_legacy_hash=legacy)
        stack = getattr(self._local, "stack", None)
        if stack is None:
            log.warning("Fast LoRA: backbone() outside a job; train only inside host.job(...)")
        elif not self._local.guarded:
            stack.enter_context(forge_training_state(sd_model) if forge else training_state(sd_model, backbone.device))
            self._local.guarded = True
        return backbone

    # -- jobs --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def job(self, title: str) -> Iterator[StateProgress]:
        """The WebUI's queue lock and progress bar, as `wrap_gradio_gpu_call` gives them.
        Re-entrant within one thread (the lock itself is not)."""
        shared = a1111("shared")
        if getattr(self._local, "progress", None) is not None:
            yield self._local.progress
            return
        with a1111("call_queue").queue_lock:
            shared.state.begin(job=title)
            try:
                with self._active(title) as progress:
                    yield progress
            finally:
                shared.state.end()
                _reset_state(shared.state)

    @contextlib.contextmanager
    def _active(self, title: str) -> Iterator[StateProgress]:
        shared = a1111("shared")
        shared.state.job = title
        shared.state.textinfo = title
        progress = StateProgress(shared.state, self._note_progress)
        stack = contextlib.ExitStack()  # holds training_state once backbone() is called
        self._local.__dict__.update(progress=progress, stack=stack, guarded=False)
        try:
            with stack:
                yield progress
        finally:
            self._local.__dict__.update(progress=None, stack=None, guarded=False)

    def _give_model_back(self) -> None:
        """End training_state now, inside the job (the next backbone() call takes it again)."""
        stack = getattr(self._local, "stack", None)
        if stack is not None:
            stack.close()
            self._local.guarded = False

    def run_job(self, title: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn(progress, *args, **kwargs)` through the WebUI's `wrap_gradio_gpu_call`:
        its queue lock (generation and checkpoint changes wait), its task id (the page's
        progress bar) and its Interrupt. Errors are raised here, not turned into HTML."""
        box: dict[str, Any] = {}

        def inner(id_task: str) -> tuple:
            try:
                with self._active(title) as progress:
                    box["result"] = fn(progress, *args, **kwargs)
            except BaseException as err:  # noqa: BLE001 - re-raised below, outside the WebUI's wrapper
                box["error"] = err
            return (None, "")

        id_task = f"task(fastlora-{uuid.uuid4().hex[:8]})"
        a1111("call_queue").wrap_gradio_gpu_call(inner, extra_outputs=[None, ""])(id_task)
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def _note_progress(self, done: int, total: int, text: str) -> None:
        with self._record_lock:
            self.record.step, self.record.total = done, total
            if text:
                self.record.text = text

    # -- tagging, saving, generating ---------------------------------------------------------
    def tagger(self, threshold: float) -> DeepbooruTagger | None:
        try:
            a1111("deepbooru")
        except ImportError:
            return None
        return DeepbooruTagger(threshold)

    def after_save(self, lora_path: Path, progress: Any = None) -> None:
        """Make a new LoRA usable at once: the WebUI's card list, and (inside a job, unless the
        settings turn it off) a `.preview.png` generated with it, as the job's last phase. Its
        card `.json` is written by the trainer's run."""
        lora_path = Path(lora_path)
        nets = lora_extension()
        if nets is not None:
            nets.list_available_networks()
        if getattr(self._local, "stack", None) is None:
            return  # generating needs the queue lock, which only a job holds
        settings = preview_settings()
        if settings.enabled:
            self._give_model_back()  # the preview uses the WebUI's own generation path
            self._make_preview(lora_path, progress or self._local.progress, settings)

    def _make_preview(self, path: Path, progress: Any, settings: PreviewSettings) -> None:
        """The card's preview image. Stop (the tab's or the WebUI's Interrupt) ends it at once
        and writes none; the LoRA is saved already, so a failure only costs the picture."""
        from lib_lora.training.export import read_metadata

        shared = a1111("shared")
        text = f"Making the preview image of {path.stem}"
        if hasattr(progress, "event"):
            progress.event({"kind": "phase", "name": "preview", "text": text})
        if hasattr(progress, "figure"):
            progress.figure = ""  # the training's last loss is not the preview's
        progress.update(0, 1, text)  # one job for the WebUI's bar: its sampler counts the steps
        if progress.cancelled():
            return
        try:
            meta = read_metadata(path)
            trigger = meta.get("ss_output_name") or path.stem
            seed = int(meta.get("ss_seed", 1234))
            with interrupt_on_cancel(progress, shared.state, settings.steps, text):
                images = self.generate([f"{trigger}, <lora:{path.stem}:1>"], seed=seed, width=settings.width,
                                       height=settings.height, steps=settings.steps, sampler_name=settings.sampler)
            if progress.cancelled() or shared.state.interrupted or not images:
                # an interrupted sampler still returns its half-denoised image: not a preview
                log.info("Fast LoRA: preview of %s stopped; the LoRA is saved", path)
                return
            write_preview(path, images[0])
            shared.state.assign_current_image(images[0])
        except Exception:  # a preview is a nicety: the LoRA is already saved
            log.warning("Fast LoRA: could not make the preview image for %s", path, exc_info=True)

    def samplers(self) -> list[str]:
        """The WebUI's visible samplers (its settings can hide some); DPM++ 2M (Karras) first when there."""
        mod = a1111("sd_samplers")
        listed = mod.visible_sampler_names() if hasattr(mod, "visible_sampler_names") else \
            [s.name for s in getattr(mod, "samplers", None) or mod.all_samplers]
        names = [getattr(n, "name", n) for n in listed]  # some forks list the sampler objects
        first = [n for n in ("DPM++ 2M Karras", "DPM++ 2M", "Euler a") if n in names][:1]
        return first + [n for n in names if n not in first]

    def generate(self, prompts: list[str], seed: int, **kw: Any) -> list:
        """Images through the WebUI's own txt2img (so `<lora:name:w>` in a prompt works),
        one per prompt, all with the same seed. Call inside a job (it needs the queue lock)."""
        processing, shared = a1111("processing"), a1111("shared")
        n = len(prompts)
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model,
            prompt=list(prompts),
            negative_prompt=kw.get("negative_prompt", ""),
            seed=[int(seed)] * n,
            sampler_name=kw.get("sampler_name", "Euler a"),
            batch_size=1,
            n_iter=n,
            steps=int(kw.get("steps", 20)),
            cfg_scale=float(kw.get("cfg_scale", 7.0)),
            width=int(kw.get("width", 512)),
            height=int(kw.get("height", 512)),
            do_not_save_samples=True,
            do_not_save_grid=True,
        )
        try:
            processed = processing.process_images(p)
        finally:
            p.close()
        return list(processed.images[-n:])

    # -- the two jobs the tab and the API start ----------------------------------------------
    def train(self, progress: StateProgress, cfg: Any, on_event: Callable[[dict], None] | None = None, *,
              given: Iterable[str] | None = None, preset: str | None = None) -> dict:
        """Train `cfg` (a TrainConfig) on the loaded checkpoint; run inside `run_job`/`job`.
        `given` and `preset`: the fields the request gave and its recipe, so the loaded model's
        family fills the rest (`prepare_train_config`)."""
        from lib_lora.training.run_config import prepare_train_config

        validate_name(cfg.name, "LoRA name")  # before the model is touched
        backbone = self.backbone()  # refusals (Forge, --lowvram, not SD1.5 or SDXL base) come first
        from lib_lora.training.run import train

        cfg = prepare_train_config(self, cfg, backbone, given=given, preset=preset)
        if isinstance(backbone, SgmBackbone) and cfg.train_text_encoder:
            log.info("Fast LoRA: %s", TE2_NOT_TRAINED)
        name = cfg.name
        shared = a1111("shared")
        events: list[dict] = []

        def event(ev: dict) -> None:
            events.append(ev)
            if ev["kind"] == "loss" and hasattr(progress, "figure"):  # the core's label carries no numbers
                progress.figure = f"loss {ev['loss']:.4f}"
            elif ev["kind"] == "probe" and hasattr(progress, "figure"):
                progress.figure = f"d*lr {ev['dlr']:.3g}"
            self._note_event(ev, shared.state)
            if on_event is not None:
                on_event(ev)

        from lib_lora.training.distributed import single_process_note

        note = single_process_note()  # started under a multi-process launcher: still one process here
        if note:
            log.warning("Fast LoRA: %s", note)
            event({"kind": "phase", "text": note, "level": "warning"})
        interrupted = False
        try:  # the model is given back at the end of the job (see backbone())
            result = train(cfg, backbone=backbone, progress=progress, on_event=event)
        except Cancelled:
            result, interrupted = None, True
        lora_path = Path(result.lora_path) if result is not None else None
        summary = {"name": name, "lora_path": str(lora_path) if lora_path else "", "interrupted": interrupted,
                   "run_dir": cfg.run_dir, "steps": _last(events, "loss", "step"), "loss": _last(events, "loss", "loss")}
        if lora_path is None or not lora_path.is_file():
            summary["lora_path"] = ""
            return summary
        self.after_save(lora_path, progress)
        return summary

    def test_grid(self, progress: StateProgress, name: str, prompts: list[str], seed: int = 1234,
                  weights: tuple[float, ...] = GRID_WEIGHTS, **kw: Any) -> tuple[Any, list[str]]:
        """(grid image, prompts) of `prompts` x LoRA `weights` at a fixed seed, rows = prompts."""
        name = validate_name(name, "LoRA name")
        full = [f"{p}, <lora:{name}:{w:g}>" for p in prompts for w in weights]
        progress.update(0, 1, f"Test grid: {len(full)} images")
        images = self.generate(full, seed, **kw)
        return grid_image(images, cols=len(weights)), full

    def _note_event(self, ev: dict, state: Any) -> None:
        kind = ev.get("kind")
        with self._record_lock:
            self.record.events.append({k: v for k, v in ev.items() if isinstance(v, int | float | str | bool)})
            if kind == "loss" and ev.get("loss") is not None:
                self.record.loss = float(ev["loss"])
            if kind == "saved" and ev.get("path"):
                self.record.lora_path = str(ev["path"])
        if kind == "phase" and ev.get("text", ev.get("phase")):
            state.textinfo = str(ev.get("text", ev.get("phase")))
        if kind == "sample" and ev.get("path"):
            from PIL import Image

            try:
                with Image.open(ev["path"]) as im:
                    state.assign_current_image(im.convert("RGB"))  # a live sample on the page's preview
            except OSError as err:  # a preview is a nicety: never stop the job for it
                log.debug("sample preview %s: %s", ev["path"], err)


def _reset_state(state: Any) -> None:
    # what wrap_gradio_call does after every job
    state.skipped = False
    state.interrupted = False
    state.stopping_generation = False
    state.job_count = 0
    state.job = ""


def _last(events: list[dict], kind: str, key: str) -> Any:
    for ev in reversed(events):
        if ev.get("kind") == kind and key in ev:
            return ev[key]
    return None


def grid_image(images: list, cols: int) -> Any:
    from PIL import Image

    rows = max(1, -(-len(images) // cols))
    w, h = images[0].size
    grid = Image.new("RGB", (w * cols, h * rows), "white")
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def grid_prompts(trigger: str, dataset: str | Path, n: int = 3, tags_per_prompt: int = 3) -> list[str]:
    """A few test prompts: the trigger word alone, then with the dataset's most common tags."""
    counts: collections.Counter[str] = collections.Counter()
    folder = Path(dataset) if dataset else None
    if folder is not None and folder.is_dir():
        for txt in sorted(folder.rglob("*.txt"))[:2000]:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                first = txt.read_text(encoding="utf-8").splitlines()[:1]
                counts.update(t.strip() for t in (first[0].split(",") if first else []) if t.strip())
    counts.pop(trigger, None)
    common = [t for t, _ in counts.most_common(n * tags_per_prompt)]
    prompts = [trigger]
    for i in range(n - 1):
        chunk = common[i * tags_per_prompt:(i + 1) * tags_per_prompt]
        if chunk:
            prompts.append(", ".join([trigger, *chunk]))
    return prompts


# --------------------------------------------------------------------------------------------
# The built-in Deepbooru, as a tagging `Tagger`


class DeepbooruTagger:
    """The WebUI's own DeepDanbooru model (`modules.deepbooru.model`): nothing to download.

    Like our ONNX taggers, `tag_images` gives {model tag name: score} per image for scores at or
    above `threshold`: the caption step applies the config's thresholds and underscore choice,
    not the WebUI's interrogate settings, so the same config captions alike on every tagger."""

    name = "deepbooru (WebUI)"

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    def tag_images(self, images: list) -> list[dict[str, float]]:
        import numpy as np

        deepbooru, devices, a_images = a1111("deepbooru"), a1111("devices"), a1111("images")
        model = deepbooru.model
        model.start()  # loads once, moves to the GPU
        try:
            out = []
            for image in images:
                # the same preparation as DeepDanbooru.tag_multi: 512x512 RGB in [0, 1], NHWC
                pic = a_images.resize_image(2, image.convert("RGB"), 512, 512)
                a = np.expand_dims(np.array(pic, dtype=np.float32), 0) / 255
                with torch.no_grad(), devices.autocast():
                    x = torch.from_numpy(a).to(devices.device, devices.dtype)
                    y = model.model(x)[0].detach().float().cpu().numpy()
                scores = zip(model.model.tags, y, strict=False)
                out.append({tag: float(p) for tag, p in scores if p >= self.threshold})
            return out
        finally:
            model.stop()


# --------------------------------------------------------------------------------------------
# One host per WebUI process

_HOST: WebUIHost | None = None


def get_host() -> WebUIHost:
    global _HOST
    if _HOST is None:
        _HOST = WebUIHost()
    return _HOST
