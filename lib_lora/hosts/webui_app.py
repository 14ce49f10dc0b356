"""What `scripts/fast_lora.py` registers with the WebUI: the tab, the settings section and the
REST routes. The WebUI's `modules` are reached only through `lib_lora.hosts.webui`.

REST (JSON), mounted on the WebUI's FastAPI app, driven like the WebUI's own API:
  POST {API_PREFIX}/train     body: TrainConfig fields, plus an optional "preset"
                              -> {"job_id", "status": "queued"}; 409 while a job runs
  GET  {API_PREFIX}/progress  -> the job record: status, step, total, loss, text, lora_path, error
  POST {API_PREFIX}/stop      -> interrupts the running job (the last checkpoint is kept)
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from typing import Any

from lib_lora.config import (
    PRESETS,
    TrainConfig,
    api_phrase,
    apply_preset,
    coerce_fields,
    for_family,
    phrase_options,
    validate,
)
from lib_lora.errors import UserError
from lib_lora.hosts import webui
from lib_lora.hosts import webui_requirements as reqs
from lib_lora.ui.paths import FolderPolicy

log = logging.getLogger(__name__)

TAB_TITLE, TAB_ID = "Fast LoRA", "fast_lora"
ACTIVE = ("queued", "running", "stopping")


# --------------------------------------------------------------------------------------------
# Settings


def settings_options() -> list[tuple[str, Any, str, dict | None]]:
    """(key, default, label, component kwargs) of the settings section. Choices given as a
    function are read when the Settings page is built (the WebUI's samplers are known then)."""
    preview = webui.PreviewSettings()
    return [
        ("fast_lora_work_dir", "", "Work folder for datasets and training runs (empty: <webui>/fast_lora)", None),
        ("fast_lora_preset", "person", "Default training preset", {"choices": list(PRESETS)}),
        ("fast_lora_preview", preview.enabled,
         "Make a preview image for the LoRA's card after each training (Stop on the Train tab ends it)", None),
        ("fast_lora_preview_width", preview.width, "Preview image width", {"minimum": 64, "maximum": 2048, "step": 8}),
        ("fast_lora_preview_height", preview.height, "Preview image height", {"minimum": 64, "maximum": 2048, "step": 8}),
        ("fast_lora_preview_steps", preview.steps, "Preview image sampling steps", {"minimum": 1, "maximum": 150, "step": 1}),
        ("fast_lora_preview_sampler", preview.sampler, "Preview image sampler",
         {"choices": lambda: webui.get_host().samplers()}),
    ]


def add_settings() -> None:
    """on_ui_settings callback: the 'Fast LoRA' section of the WebUI's Settings."""
    import gradio as gr

    shared = webui.a1111("shared")
    for key, default, label, kwargs in settings_options():
        component, args = None, kwargs
        if kwargs and "choices" in kwargs:
            choices = kwargs["choices"]
            if callable(choices):
                component, args = gr.Dropdown, (lambda choices=choices: {"choices": choices()})
            else:
                component = gr.Radio if len(choices) <= 3 else gr.Dropdown
        elif kwargs:
            component = gr.Slider
        shared.opts.add_option(key, shared.OptionInfo(default, label, component, args, section=webui.SETTINGS_SECTION))


# --------------------------------------------------------------------------------------------
# Jobs started from the API (or the fallback tab): one at a time, in a thread


def request_preset(body: dict[str, Any] | None) -> str:
    """The recipe a JSON body asks for: its "preset", else the setting "Default training preset"."""
    return str((body or {}).get("preset") or webui.opt("fast_lora_preset", "") or "")


def request_fields(body: dict[str, Any] | None) -> frozenset[str]:
    """The TrainConfig fields a JSON body gives: the loaded model's family fills the others."""
    return frozenset(body or {}) - {"preset"}


def config_from_request(body: dict[str, Any], policy: FolderPolicy | None = None) -> TrainConfig:
    """A validated TrainConfig from a JSON body: the preset (or the default preset), then the
    fields; every path in it through the host's path `policy` before anything looks at it.
    The preset's values here are SD1.5's: the run itself takes the loaded model's family's
    (`start_training` passes `request_fields` and the preset on)."""
    body = dict(body or {})
    preset = request_preset(body)
    body.pop("preset", None)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(body) - names)
    if unknown:
        raise UserError(f"Unknown training option(s): {', '.join(unknown)}.")
    cfg = apply_preset(TrainConfig(), preset) if preset else TrainConfig()
    cfg = dataclasses.replace(cfg, **coerce_fields(TrainConfig, body))
    if not cfg.name:
        raise UserError("Give the LoRA a name (the 'name' field).")
    if not cfg.dataset:
        raise UserError("Give the dataset folder (the 'dataset' field).")
    return validate((policy or FolderPolicy()).check_config(cfg))


def start_training(host: webui.WebUIHost, cfg: TrainConfig, given: frozenset[str] | None = None,
                   preset: str | None = None) -> str:
    """Queue a training job in a thread; it waits for the WebUI's queue lock. Returns its id.
    `given`/`preset`: the request's fields and recipe (the loaded model's family fills the rest)."""
    with host._record_lock:
        if host.record.status in ACTIVE:
            raise JobBusy("A Fast LoRA training job is already queued or running; stop it or wait for it to end.")
        job_id = uuid.uuid4().hex[:12]
        host.record = webui.JobRecord(job_id=job_id, status="queued", title=f"Training {cfg.name}")
    threading.Thread(target=_run_training, args=(host, cfg, job_id, given, preset), name=f"fast-lora-{job_id}", daemon=True).start()
    return job_id


class JobBusy(UserError):
    pass


def _run_training(host: webui.WebUIHost, cfg: TrainConfig, job_id: str, given: frozenset[str] | None = None,
                  preset: str | None = None) -> None:
    record = host.record

    def body(progress: webui.StateProgress) -> dict:
        if record.status == "stopping":  # stopped while it waited for the lock
            return {"interrupted": True, "lora_path": ""}
        record.status = "running"
        return host.train(progress, cfg, given=given, preset=preset or None)

    try:
        summary = host.run_job(record.title, body)
        record.status = "interrupted" if summary.get("interrupted") else "done"
        record.lora_path = summary.get("lora_path", "") or record.lora_path
    except UserError as err:
        record.status, record.error = "error", phrase_options(str(err), api_phrase)
    except Exception as err:  # noqa: BLE001 - reported through the API, logged in full
        log.exception("Fast LoRA training failed")
        record.status, record.error = "error", f"{type(err).__name__}: {err}"


def stop_training(host: webui.WebUIHost) -> bool:
    """Interrupt our job (and only ours: a generation in progress is left alone)."""
    with host._record_lock:
        status = host.record.status
        if status == "queued":
            host.record.status = "stopping"
            return True
        if status == "running":
            webui.a1111("shared").state.interrupt()
            return True
    return False


def api_auth_dependencies() -> list[Any]:
    """With --api-auth, the same HTTP Basic check the WebUI puts on its /sdapi routes
    (modules/api/api.py, `Api.auth`); without it, none, as there."""
    credentials = webui.api_credentials()
    if credentials is None:
        return []
    from secrets import compare_digest

    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic

    # `given` is an HTTPBasicCredentials; unannotated, because this module's annotations are
    # strings that FastAPI would look up among the module's globals.
    def auth(given=Depends(HTTPBasic())) -> bool:  # noqa: B008 - FastAPI's idiom
        password = credentials.get(given.username)
        if password is not None and compare_digest(given.password.encode(), password.encode()):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return [Depends(auth)]


def mount_api(app: Any, host: webui.WebUIHost) -> None:
    """on_app_started callback body: add the routes to the WebUI's FastAPI app."""
    from fastapi import Body, HTTPException

    prefix = webui.API_PREFIX
    guarded = {"dependencies": api_auth_dependencies()}

    @app.post(f"{prefix}/train", **guarded)
    def api_train(body: dict = Body(...)) -> dict:  # noqa: B008 - FastAPI's idiom
        try:
            cfg = config_from_request(body, host.path_policy())
            job_id = start_training(host, cfg, request_fields(body), request_preset(body))
        except JobBusy as err:
            raise HTTPException(status_code=409, detail=phrase_options(str(err), api_phrase)) from None
        except UserError as err:
            raise HTTPException(status_code=400, detail=phrase_options(str(err), api_phrase)) from None
        return {"job_id": job_id, "status": "queued"}

    @app.get(f"{prefix}/progress", **guarded)
    def api_progress() -> dict:
        return host.record.as_dict()

    @app.post(f"{prefix}/stop", **guarded)
    def api_stop() -> dict:
        return {"stopping": stop_training(host), "status": host.record.status}


def on_app_started(demo: Any, app: Any) -> None:
    mount_api(app, webui.get_host())


# --------------------------------------------------------------------------------------------
# The tab


def missing_banner() -> str:
    installed = reqs.installed_distributions(reqs.relevant_names())
    steps = reqs.plan(installed)
    held = [reqs.blocked_message(*b) for b in reqs.blocked(installed)]
    if not steps and not held:
        return ""
    import sys

    text = "".join(f"**Fast LoRA:** {line}\n\n" for line in held)
    if steps:
        names = ", ".join(n for step in steps for n in step.names)
        lines = "\n".join(f"    {reqs.command_line([sys.executable, '-m', 'pip', *step.pip_args()])}" for step in steps)
        text += (f"**Fast LoRA is missing {names}** (its installer could not add them). "
                 f"Steps that need them will not work. Install them by hand, then restart the WebUI:\n\n{lines}\n")
    return text


def ui_tabs() -> list[tuple[Any, str, str]]:
    """on_ui_tabs callback: the UI's tabs when that part is installed, else a minimal Train tab."""
    import gradio as gr

    host = webui.get_host()
    banner = missing_banner()
    try:
        from lib_lora.ui.app import build_tabs
    except ImportError as err:
        log.info("Fast LoRA: the full UI is not available (%s); showing the minimal Train tab", err)
        build_tabs = None
    if build_tabs is not None and not banner:
        return [(build_tabs(host, host.path_policy()), TAB_TITLE, TAB_ID)]
    with gr.Blocks(analytics_enabled=False) as blocks:
        if banner:
            gr.Markdown(banner)
        if build_tabs is not None:
            build_tabs(host, host.path_policy())
        else:
            build_minimal_tab(host)
    return [(blocks, TAB_TITLE, TAB_ID)]


def _component(gr: Any, f: dataclasses.Field, default: Any) -> Any:
    from lib_lora.config import field_type

    typ, _ = field_type(TrainConfig, f)
    label = f"{f.name} — {f.metadata.get('help', '')}"
    choices = f.metadata.get("choices")
    if choices:
        return gr.Dropdown(choices=list(choices), value=default, label=label)
    if typ is bool:
        return gr.Checkbox(value=bool(default), label=label)
    if typ in (int, float):
        return gr.Number(value=default, label=label, precision=0 if typ is int else None)
    return gr.Textbox(value="" if default is None else str(default), label=label)


def form_values_to_config(fields: list[dataclasses.Field], values: list[Any],
                          policy: FolderPolicy | None = None) -> TrainConfig:
    kwargs = coerce_fields(TrainConfig, {f.name: v for f, v in zip(fields, values, strict=True)})
    return validate((policy or FolderPolicy()).check_config(dataclasses.replace(TrainConfig(), **kwargs)))


def changed_from(cfg: TrainConfig, shown: TrainConfig, names: list[str]) -> frozenset[str]:
    """The fields of `names` the user changed: `cfg`'s value is not the one the form showed."""
    return frozenset(n for n in names if getattr(cfg, n) != getattr(shown, n))


def build_minimal_tab(host: webui.WebUIHost) -> None:
    """Train on the loaded checkpoint, then a test grid: the fields come from TrainConfig."""
    import gradio as gr

    def ui_text(text: str) -> str:  # this tab labels each control by its field name
        return phrase_options(text, api_phrase)

    preset = webui.opt("fast_lora_preset", "person")
    preset = preset if preset in PRESETS else None
    family = host.model_family()  # the fields show its defaults and recipe; the run takes the model's own
    base = for_family(TrainConfig(), family, given=(), preset=preset)
    skip = {"base_model", "output_dir", "device"}  # the WebUI decides these
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name not in skip]
    gr.Markdown(f"Trains a LoRA on the checkpoint loaded at the top of the page ({family.label} when this page "
                "was made: the fields show its defaults); the result appears under Lora at once (`<lora:name:1>`).")
    comps = []
    with gr.Row():
        with gr.Column():
            for f in fields:
                if f.metadata.get("group") == "basic":
                    comps.append((f, _component(gr, f, getattr(base, f.name))))
            with gr.Accordion("Advanced", open=False):
                for f in fields:
                    if f.metadata.get("group") != "basic":
                        comps.append((f, _component(gr, f, getattr(base, f.name))))
            with gr.Row():
                train_btn = gr.Button("Train", variant="primary", elem_id="fast_lora_train")
                stop_btn = gr.Button("Stop", elem_id="fast_lora_stop")
            status = gr.Markdown()
        with gr.Column():
            grid_prompts_box = gr.Textbox(label="Test prompts (one per line; empty: from the dataset's tags)", lines=3)
            grid_seed = gr.Number(value=1234, label="Seed", precision=0)
            grid_btn = gr.Button("Test grid (weights 0, 0.5, 0.75, 1)")
            grid_img = gr.Image(label="Rows: prompts; columns: LoRA weight", type="pil", interactive=False)
            grid_prompt = gr.Textbox(label="Prompt", interactive=False, elem_id="fast_lora_grid_prompt")
            _send_to_txt2img(grid_prompt)

    ordered = [f for f, _ in comps]
    inputs = [c for _, c in comps]

    def on_train(*values: Any) -> str:
        try:
            cfg = form_values_to_config(ordered, list(values), host.path_policy())
            given = changed_from(cfg, base, [f.name for f in ordered]) | {"name", "dataset"}
            summary = host.run_job(f"Training {cfg.name}", host.train, cfg, given=given, preset=preset)
        except UserError as err:
            return f"**{ui_text(str(err))}**"
        if summary.get("interrupted"):
            return f"Stopped. The last checkpoint is in `{summary.get('run_dir')}`."
        return f"Done: `{summary['lora_path']}` — use `<lora:{cfg.name}:1>` in a prompt."

    def on_stop() -> str:
        return "Stopping..." if stop_training(host) or _interrupt_running(host) else "Nothing to stop."

    def on_grid(*values: Any) -> tuple:
        try:
            cfg = form_values_to_config(ordered, list(values[:-2]), host.path_policy())
            text, seed = values[-2], int(values[-1] or 1234)
            prompts = [p.strip() for p in (text or "").splitlines() if p.strip()]
            if not prompts:
                prompts = webui.grid_prompts(cfg.class_tokens or cfg.name, cfg.dataset)
            grid, full = host.run_job("Fast LoRA test grid", host.test_grid, cfg.name, prompts, seed)
        except UserError as err:
            return None, ui_text(str(err))
        return grid, full[-1]

    train_btn.click(on_train, inputs=inputs, outputs=[status])
    stop_btn.click(on_stop, inputs=[], outputs=[status])
    grid_btn.click(on_grid, inputs=inputs + [grid_prompts_box, grid_seed], outputs=[grid_img, grid_prompt])


def _interrupt_running(host: webui.WebUIHost) -> bool:
    # a job started from this tab (not through the API) has no record; it holds shared.state
    state = webui.a1111("shared").state
    if str(getattr(state, "job", "")).startswith("Training "):
        state.interrupt()
        return True
    return False


def _send_to_txt2img(prompt_box: Any) -> None:
    """The WebUI's own "Send to txt2img" button for the grid's prompt (modules.infotext_utils)."""
    try:
        infotext_utils = webui.a1111("infotext_utils")
    except ImportError:
        return
    buttons = infotext_utils.create_buttons(["txt2img"])
    infotext_utils.register_paste_params_button(
        infotext_utils.ParamBinding(paste_button=buttons["txt2img"], tabname="txt2img", source_text_component=prompt_box)
    )
