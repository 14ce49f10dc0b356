"""Steps 5-6: the recipe (preset, name, repeats/epochs/batch with the live step count, the
learning rate auto or manual, advanced options generated from the schema) and the run: a
progress bar with ETA, the live loss chart, the LR-probe plot and samples as they are made.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from lib_lora import config
from lib_lora.errors import UserError
from lib_lora.filememo import FileMemo
from lib_lora.names import SUBSET_RE, validate_name
from lib_lora.training.family import SD15, ModelFamily, family_by_name
from lib_lora.ui import compat, forms, steps, widgets
from lib_lora.ui.context import UIContext
from lib_lora.ui.jobs import job_updates, stop_handler

ID = "fast_lora_train_"
TAB = "train"  # the runner's key for this tab's jobs
# Handled by dedicated controls (or by the host) instead of generated ones.
SPECIAL = {"lr", "output_dir", "dataset", "name"}
# Basic controls shown side by side; any other basic field follows, one per line.
ROWS = (("repeats", "epochs", "batch_size", "max_steps"), ("dim", "alpha", "optimizer"), ("resolution", "base_model"))
STEP_FIELDS = ("repeats", "epochs", "batch_size", "max_steps")
FIXED = ("name", "dataset", "lr", "output_dir", "run_dir")  # set by the tab's own controls or the host
TAB_CHOICES = ("sample_images",)  # values the tab itself fills in, whatever the family (`filled`)
UI_SAMPLE_IMAGES = 4  # sample points in a run started from the tab
DEFAULT_PRESET = "person"  # the tutorial's recipe; a host may name another (`host.default_preset`)
METADATA_SHOWN = ("ss_output_name", "ss_network_dim", "ss_network_alpha", "ss_optimizer", "ss_learning_rate",
                  "ss_unet_lr", "ss_text_encoder_lr", "ss_num_train_images", "ss_max_train_steps", "ss_steps",
                  "ss_sd_model_name", "sshs_model_hash")


@dataclasses.dataclass
class TrainForm:
    """The Train tab's controls in a fixed order; `values` follow `names`."""

    names: list[str]
    has_base_model: bool
    # The live step count's memo of each image (size, readable or not), made on first use: a
    # change of repeats or epochs then re-plans without reading the images again.
    images: FileMemo | None = dataclasses.field(default=None, repr=False, compare=False)

    def config(self, ctx: UIContext, name: str, dataset: str, lr_mode: str, lr_value: str, values: list[Any]) -> Any:
        """A validated TrainConfig, or UserError with the message the page shows."""
        name = validate_name(name or "", "LoRA name")
        dataset_dir = self.dataset_folder(ctx, dataset, values)
        lr = "auto" if lr_mode == "auto" else str(lr_value or "").strip()
        if lr_mode != "auto" and not lr:
            raise UserError("Learning rate is empty: give a number such as 1e-4, or choose auto.")
        fixed = {"name": name, "dataset": dataset_dir, "lr": lr, "output_dir": str(ctx.host.lora_dir())}
        cfg = forms.collect(config.TrainConfig, self.names, values, policy=ctx.policy, **fixed)
        run_dir = cfg.run_dir or str(ctx.host.work_dir() / "runs" / name)
        return dataclasses.replace(cfg, run_dir=str(ctx.policy.check(run_dir, "run folder", must_exist=False)))

    def lists_subsets(self, values: list[Any]) -> bool:
        """Whether the Subsets field names image folders (then the dataset field is not needed)."""
        if "subsets" not in self.names:
            return False
        try:
            return bool(config.coerce(config.TrainConfig, "subsets", values[self.names.index("subsets")]))
        except UserError:  # given, but not JSON: the config's own reading says what is wrong
            return True

    def dataset_folder(self, ctx: UIContext, dataset: str, values: list[Any]) -> str:
        """The dataset field through the folder policy; empty when it is empty and the Subsets
        field lists the folders instead (their folders then go through the policy)."""
        if not str(dataset or "").strip() and self.lists_subsets(values):
            return ""
        return str(ctx.policy.check(dataset, "dataset folder"))

    def given(self, cfg: Any, family: ModelFamily, preset: str | None) -> frozenset[str]:
        """The fields the user gave: the fixed ones (name, dataset, learning rate, folders, the
        chosen base model), the tab's own choices (sample images) and every control whose value
        is not the one the tab filled in for `family` and `preset` (`filled`). The run's family
        fills the others."""
        shown = filled(family, preset)
        changed = {n for n in self.names if n != "base_model" and getattr(cfg, n) != getattr(shown, n)}
        own = {n for n in TAB_CHOICES if n in self.names} | ({"base_model"} if self.has_base_model else set())
        return frozenset(changed | set(FIXED) | own)


def filled(family: ModelFamily, preset: str | None) -> Any:
    """The values the tab fills in for a model of `family`: the family's defaults, its recipe
    `preset`, and the tab's own sample images."""
    ui = dataclasses.replace(config.TrainConfig(), sample_images=UI_SAMPLE_IMAGES)
    return config.for_family(ui, family, given=TAB_CHOICES, preset=preset if preset in family.presets else None)


def model_family(ctx: UIContext, base_model: str | None) -> ModelFamily:
    """The family of the model a run would train: the chosen base model's (read from its file's
    header or folder), or the host's loaded checkpoint's; SD1.5 where it cannot tell (the run's
    loading then says what is wrong with the model)."""
    try:
        if hasattr(ctx.host, "base_model"):
            from lib_lora.training.models_sdxl import model_family as family_name

            return family_by_name(family_name(str(base_model or ctx.host.base_model)))
        of_host = getattr(ctx.host, "model_family", None)
        return of_host() if callable(of_host) else SD15
    except (UserError, ImportError, OSError):
        return SD15


def family_text(family: ModelFamily) -> str:
    """The line under the preset: which family the fields are filled for, and its defaults."""
    cfg = filled(family, None)
    trains = "the U-Net and text encoder" if cfg.train_text_encoder else "the U-Net only"
    return (f"Model family: {family.label}. Its defaults: {cfg.resolution} px, buckets "
            f"{cfg.min_bucket_reso}-{cfg.max_bucket_reso} px, training {trains}; the presets are its recipes.")


def family_values(ctx: UIContext, form: TrainForm, shown: str, preset: str, base_model: str | None,
                  *values: Any) -> list[Any]:
    """(family state, family line, controls) when the model's family changes: each control the
    user left as the tab filled it takes the new family's value; changed ones stay."""
    new = model_family(ctx, base_model if form.has_base_model else None)
    old = family_by_name(shown) if shown else SD15
    if new is old:
        return [gr.update(), family_text(new), *(gr.update() for _ in form.names)]
    before, after = filled(old, preset), filled(new, preset)
    out = []
    for n, v in zip(form.names, values, strict=True):
        try:
            left = config.coerce(config.TrainConfig, n, v) == getattr(before, n)
        except UserError:
            left = False
        out.append(forms.values_of(after, [n])[0] if left and n != "base_model" else gr.update())
    return [new.name, family_text(new), *out]


def step_count(ctx: UIContext, form: TrainForm, dataset: str, values: list[Any], lr_mode: str = "manual") -> str:
    """The live step count: images x repeats x epochs / batch, as the tutorial computes 35 x 30 = 1050;
    with the LR probe's steps and a time estimate after it."""
    return plan_texts(ctx, form, dataset, values, lr_mode)[0]


def plan_texts(ctx: UIContext, form: TrainForm, dataset: str, values: list[Any],
               lr_mode: str = "manual", family: ModelFamily = SD15) -> tuple[str, str]:
    """(the step count with the probe and the time estimate, the note beside Repeats); for a
    model of another family than SD1.5, with the family line the CLI's plan has."""
    data = steps.training_data()
    if isinstance(data, steps.Missing):
        return data.message(), ""
    if not str(dataset or "").strip() and not form.lists_subsets(values):
        return "Choose a dataset folder to see the step count.", ""
    try:
        dataset_dir = form.dataset_folder(ctx, dataset, values)
        cfg = forms.collect(config.TrainConfig, form.names, values, policy=ctx.policy, dataset=dataset_dir,
                            name="preview")
        if form.images is None:
            form.images = FileMemo(data.read_image)
        plan = data.plan_steps(dataset_dir, cfg, read=form.images)
    except UserError as err:
        return f"⚠ {err}", ""
    from lib_lora.training.optim import lr_plan

    # The U-Net's learning rate is the control beside the plan: the text encoder's is said relative to it.
    text = describe_plan(plan, cfg.max_steps) + "  \n" + forms.ui_text(lr_plan(cfg, with_unet=False))
    if family is not SD15:
        from lib_lora.training.run_config import family_note

        text += "  \n" + family_note(cfg, family)
    total = plan.total_steps
    if lr_mode == "auto":
        from lib_lora.training.probe import probe_budget

        budget = probe_budget(total, cfg.probe_fraction, cfg.probe_min_steps, cfg.probe_max_steps)
        text += (f"  \nFirst the learning-rate probe: up to {budget} steps (it stops once the rate settles), "
                 f"so up to **{budget + total} steps** in all.")
        total += budget
    return text + "  \n" + time_estimate(ctx, form, cfg, total), repeats_note(plan, cfg, dataset_dir)


def _run_dirs(ctx: UIContext, cfg: Any) -> list[Path]:
    runs = ctx.host.work_dir() / "runs"
    allowed = ctx.policy.allows(runs.resolve())
    found = sorted(p for p in runs.iterdir() if p.is_dir()) if allowed and runs.is_dir() else []
    return ([Path(cfg.run_dir)] if cfg.run_dir else []) + found


def time_estimate(ctx: UIContext, form: TrainForm, cfg: Any, total_steps: int) -> str:
    """'About 12 min' from the step time a finished run measured with the same model, device,
    resolution and batch size (its run folder keeps it), and where the figure comes from."""
    from lib_lora.training import timing

    loaded = getattr(ctx.host, "loaded_model_name", None)
    own = loaded() if not form.has_base_model and callable(loaded) else ""
    if own:  # the host trains its loaded model: a run on another one (SD1.5 vs SDXL: 5-20x) says nothing
        cfg = dataclasses.replace(cfg, base_model=own)
    est = timing.find(_run_dirs(ctx, cfg), cfg, any_model=not form.has_base_model and not own)
    if est is None:
        return ("No time estimate yet: each run measures its step time, and the next plan with the same "
                "model, device, resolution and batch size shows how long it takes.")
    minutes = est.minutes(total_steps)
    if minutes < 1:
        about = "under a minute"
    elif minutes < 90:
        about = f"about {round(minutes)} min"
    else:
        about = f"about {minutes / 60:.1f} h"
    return (f"Time: {about} ({est.seconds_per_step:.2f} s per step, measured by the run "
            f"'{est.run}' on {est.device}; samples add their own time).")


def repeats_note(plan: Any, cfg: Any, dataset_dir: Path | str) -> str:
    """Which repeat count is used and why: a `<repeats>_<name>` subfolder's number wins over the field."""
    if cfg.subsets:
        return ("Each Subsets entry gives its own repeats (its \"repeats\", else its folders' numbers); the "
                "Repeats field applies to entries without either.")
    named = [s for s in plan.subsets or [] if s["folder"] != Path(dataset_dir).name and SUBSET_RE.match(s["folder"])]
    if not named:
        return f"Using {cfg.repeats} repeats (the Repeats field) for the images in {Path(dataset_dir).name}."
    used = "; ".join(f"{s['repeats']} repeats from the folder name {s['folder']}" for s in named[:4])
    more = f" and {len(named) - 4} more folders" if len(named) > 4 else ""
    return (f"Using {used}{more}. The Repeats field ({cfg.repeats}) applies only to images directly in the "
            "dataset folder; rename the folder to change its number.")


def describe_plan(plan: Any, max_steps: int | None = None) -> str:
    subsets = plan.subsets or []
    if len(subsets) == 1:
        s = subsets[0]
        head = f"{s['images']} images × {s['repeats']} repeats"
    else:
        head = f"{plan.images_with_repeats} images with repeats"
    if max_steps:
        line = (f"**{plan.total_steps} steps** (max steps; one epoch is {plan.steps_per_epoch} = {head} "
                f"÷ batch {plan.batch_size})")
    else:
        epochs = f"{plan.epochs} epoch{'s' if plan.epochs != 1 else ''}"
        line = f"**{plan.total_steps} steps** = {head} × {epochs} ÷ batch {plan.batch_size}"
        if len(plan.buckets) > 1 or plan.batch_size > 1:
            line += f" (rounded up per bucket: {plan.steps_per_epoch} per epoch)"
    if getattr(plan, "skipped", None):
        line += f"; {len(plan.skipped)} file(s) skipped"
    return line


@dataclasses.dataclass
class Live:
    """What the page shows of a run, rebuilt from the job's events."""

    seen: int = 0
    phase: str = ""
    losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    probe: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    probe_plot: str | None = None
    samples: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    changed_loss: bool = False
    changed_probe: bool = False
    changed_samples: bool = False
    ran: list[str] = dataclasses.field(default_factory=list)

    def feed(self, events: list[dict[str, Any]]) -> None:
        self.changed_loss = self.changed_probe = self.changed_samples = False
        for ev in events:
            kind = ev.get("kind")
            if kind == "phase":
                self.phase = str(ev.get("name") or ev.get("text") or ev.get("phase") or "")
            elif kind == "loss" and ev.get("loss") is not None:
                self.losses.append((int(ev.get("step", len(self.losses))), float(ev["loss"])))
                self.changed_loss = True
            elif kind == "probe" and ev.get("dlr") is not None:
                self.probe.append((int(ev.get("step", len(self.probe))), float(ev["dlr"])))
                self.changed_probe = True
            elif kind == "probe_done":
                plot = ev.get("plot") or ev.get("plot_path") or ev.get("path")
                self.probe_plot = str(plot) if plot else None
                self.changed_probe = True
            elif kind == "sample" and ev.get("path"):
                self.samples.append((str(ev["path"]), f"step {ev.get('step', '')}"))
                self.changed_samples = True
        self.seen += len(events)

    def status_text(self, label: str) -> str:
        """The current phase's label (the core's progress text) and one figure: the chart's
        smoothed loss while training, the probe's d*lr while probing."""
        from lib_lora.training.probe import PROBE_LABEL

        label = label or self.phase
        if label == PROBE_LABEL and self.probe:
            return f"{label} · d*lr {self.probe[-1][1]:.3g}"
        if self.losses and label != PROBE_LABEL:
            return f"{label} · smoothed loss {widgets.smoothed([v for _, v in self.losses])[-1]:.4f}"
        return label

    def probe_image(self) -> Any:
        if self.probe_plot and Path(self.probe_plot).is_file():
            return widgets.thumbnail(self.probe_plot, 800)
        return widgets.loss_chart(self.probe, title="d*lr")

    def sample_items(self) -> list[tuple[Any, str]]:
        return [(widgets.thumbnail(p, 384), cap) for p, cap in self.samples if Path(p).is_file()]


def result_text(result: Any) -> tuple[str, list[list[str]]]:
    meta = dict(getattr(result, "metadata", {}) or {})
    rows = [[k, str(meta[k])] for k in METADATA_SHOWN if k in meta]
    loss = getattr(result, "final_loss", None)
    loss_text = f", final loss {loss:.4f}" if isinstance(loss, float) else ""
    text = f"Saved {result.lora_path} ({result.steps} steps{loss_text})."
    return text, rows or [["", ""]]


STOPPED = "Stopped: the run's state is kept in its run folder; start again to resume."


def run_train(ctx: UIContext, form: TrainForm, name: str, dataset: str, lr_mode: str, lr_value: str,
              *values: Any, preset: str | None = None, shown: str | None = None) -> Iterator[tuple]:
    """Generator handler: (progress, loss chart, probe plot, samples, result text, metadata rows,
    lora name, Start button). `shown`: the family the tab filled the controls for, and `preset`
    its recipe: the controls left as filled take the run's model's family's values; without
    `shown` every control is taken as given."""
    keep = (gr.update(),) * 6
    idle = gr.update(interactive=True)
    run = steps.training_run()
    if isinstance(run, steps.Missing):
        yield (widgets.message_html(run.message(), "missing"), *keep, idle)
        return
    try:
        cfg = form.config(ctx, name, dataset, lr_mode, lr_value, list(values))
        given = form.names + list(FIXED) if shown is None else form.given(cfg, family_by_name(shown), preset)
        # A user preset's values are the user's (given); only a family's built-in recipe is re-filled.
        recipe = preset if shown is not None and preset in family_by_name(shown).presets else None

        def work(p: Any) -> Any:
            from lib_lora.training.run_config import prepare_train_config

            p.update(0, 1, "loading the base model")
            backbone = ctx.host.backbone(cfg.base_model if form.has_base_model else None)
            # as the REST route and the CLI do: the model's family fills what the user did not give
            train_cfg = prepare_train_config(ctx.host, cfg, backbone, given=given, preset=recipe)
            result = run.train(train_cfg, backbone=backbone, progress=p, on_event=p.event)
            ctx.host.after_save(Path(result.lora_path), p)
            return result

        job = ctx.runner.start("Train", work, tab=TAB)
    except UserError as err:
        yield (widgets.message_html(str(err), "error"), *keep, idle)
        return
    yield from follow_train(job)


def reattach(ctx: UIContext) -> Iterator[tuple]:
    """On page load: show the tab's running or last run (progress, charts, samples, result)."""
    job = ctx.runner.job_for(TAB)
    if job is None:
        yield (gr.update(),) * 8
        return
    yield from follow_train(job)


def ran_lines(events: list[dict[str, Any]]) -> list[str]:
    """What actually ran where the form cannot say it: the optimizer used (and why it differs)."""
    out = []
    for ev in events:
        if ev.get("kind") == "optimizer" and ev.get("used"):
            used = str(ev["used"]).rsplit(".", 1)[-1]
            why = f" ({ev['note']})" if ev.get("note") else ""
            out.append(f"optimizer: {used}{why}")
    return out[-1:]


def follow_train(job: Any) -> Iterator[tuple]:
    """The page's view of a training job, from its first event: a new run clears the last
    one's chart, samples and result at once; Start stays disabled while it runs."""
    live = Live()
    busy = gr.update(interactive=False)
    yield (widgets.progress_html(0, 0, "starting"), None, None, [], "", [["", ""]], gr.update(), busy)
    for j in job_updates(job):
        p = j.progress
        events = p.events_since(live.seen)
        live.feed(events)
        live.ran = ran_lines(events) or live.ran
        text = live.status_text(p.text)
        status = widgets.progress_html(p.done, p.total, text, p.eta_seconds(), p.elapsed(),
                                       state="running" if j.running else "done")
        status += widgets.ran_html(live.ran) + widgets.warnings_html(p.warnings)
        yield (status,
               widgets.loss_chart(live.losses) if live.changed_loss else gr.update(),
               live.probe_image() if live.changed_probe else gr.update(),
               live.sample_items() if live.changed_samples else gr.update(),
               gr.update(), gr.update(), gr.update(), busy)
    tail = widgets.ran_html(live.ran) + widgets.warnings_html(job.progress.warnings)
    idle = gr.update(interactive=True)
    if job.error or job.cancelled:
        kind = "error" if job.error else "stopped"
        yield (widgets.message_html(job.error or STOPPED, kind) + tail, *(gr.update(),) * 6, idle)
        return
    text, rows = result_text(job.result)
    lora_name = Path(job.result.lora_path).stem
    yield (widgets.message_html(text, "ok") + tail, widgets.loss_chart(live.losses) or gr.update(), gr.update(),
           live.sample_items() or gr.update(), text, rows, lora_name, idle)


def presets_folder(ctx: UIContext) -> Path:
    """Where the tab keeps user presets: <work folder>/presets (through the path policy)."""
    from lib_lora.user_presets import presets_dir

    return ctx.policy.place(presets_dir(ctx.host.work_dir()), "presets folder")


def preset_choices(ctx: UIContext | None) -> list[str]:
    """The built-in presets, then the user's."""
    from lib_lora.user_presets import list_presets

    users: list[str] = []
    if ctx is not None:
        try:
            users = list_presets(presets_folder(ctx))
        except UserError:  # a work folder outside the allowed ones: the built-in presets only
            users = []
    return [*config.PRESETS, *users]  # the built-in names are the same in every family


def _recipe_of(ctx: UIContext | None, preset: str, family: ModelFamily = SD15) -> tuple[dict[str, Any], str]:
    """(field -> value, a note) for a built-in preset (the family's recipe) or a user preset."""
    if preset in family.presets:
        return dict(family.presets[preset]), ""
    if ctx is None:
        raise UserError(f"Unknown preset {preset!r}.")
    from lib_lora.config_files import file_config
    from lib_lora.user_presets import read_preset

    cf = read_preset(presets_folder(ctx), preset)
    cfg = file_config([cf], config.TrainConfig())
    return {k: getattr(cfg, k) for k in cf.values}, cf.report()


def fill_values(form: TrainForm, recipe: dict[str, Any], values: tuple[Any, ...] | list[Any]) -> list[Any]:
    """[lr mode, lr value, *controls]: the recipe's fields filled in, the rest as they are."""
    out = []
    for n, v in zip(form.names, values, strict=True):
        out.append(forms.values_of(dataclasses.replace(config.TrainConfig(), **{n: recipe[n]}), [n])[0]
                   if n in recipe else v)
    lr = recipe.get("lr")
    lr_mode = gr.update() if lr is None else ("auto" if lr == "auto" else "manual")
    lr_value = gr.update() if lr is None or lr == "auto" else str(lr)
    return [lr_mode, lr_value, *out]


def preset_values(form: TrainForm, preset: str, *values: Any, ctx: UIContext | None = None,
                  family: ModelFamily = SD15) -> list[Any]:
    """Fill the recipe from a preset (the family's built-in one or the user's): controls take the
    preset's values, the rest stay as they are."""
    if not isinstance(preset, str) or not preset:
        return [gr.update() for _ in range(len(form.names) + 2)]
    try:
        recipe, _ = _recipe_of(ctx, preset, family)
    except UserError:
        return [gr.update() for _ in range(len(form.names) + 2)]
    return fill_values(form, recipe, values)


def save_preset(ctx: UIContext, form: TrainForm, preset_name: str, lr_mode: str, lr_value: str,
                *values: Any) -> tuple[str, Any]:
    """Save the form's recipe as a user preset: (status, the preset list with it chosen)."""
    from lib_lora.user_presets import save_preset as write

    try:
        lr = "auto" if lr_mode == "auto" else str(lr_value or "").strip()
        cfg = forms.collect(config.TrainConfig, form.names, list(values), policy=ctx.policy, lr=lr or "1e-4")
        path = write(presets_folder(ctx), preset_name, cfg)
    except UserError as err:
        return widgets.message_html(str(err), "error"), gr.update()
    name = path.stem
    return (widgets.message_html(f"Saved the preset “{name}” ({path}).", "ok"),
            gr.update(choices=preset_choices(ctx), value=name))


def save_config(ctx: UIContext, form: TrainForm, path: str, name: str, dataset: str, lr_mode: str, lr_value: str,
                *values: Any) -> str:
    """Save config: the whole form as our TOML (or .json) at `path`, a path the policy allows."""
    from lib_lora.config_files import save_config_file

    try:
        target = ctx.policy.check(path, "config file", must_exist=False, kind="file")
        cfg = form.config(ctx, name, dataset, lr_mode, lr_value, list(values))
        written = save_config_file(cfg, target)
    except UserError as err:
        return widgets.message_html(str(err), "error")
    return widgets.message_html(f"Saved the config to {written}.", "ok")


def load_config(ctx: UIContext, form: TrainForm, path: str, *values: Any) -> list[Any]:
    """Load config: our file, a run folder's config.json or a kohya file into the form:
    [status, name, dataset, lr mode, lr value, *controls]. What it held that the tab cannot use
    (kohya's unsupported keys, options the host decides) is named in the status."""
    from lib_lora.config_files import file_config, read_config_file

    keep = [gr.update() for _ in range(len(form.names) + 4)]
    try:
        source = ctx.policy.check(path, "config file", kind="file")
        cf = read_config_file(source)
        cfg = file_config([cf], config.TrainConfig())
    except UserError as err:
        return [widgets.message_html(str(err), "error"), *keep]
    shown = set(form.names) | {"name", "dataset", "lr"}
    # The host's choices (the LoRA folder; the base model in the WebUI): said when the file wants another.
    host_values = {"output_dir": str(ctx.host.lora_dir())}
    elsewhere = [k for k in cf.values if k not in shown
                 and getattr(cfg, k) not in (host_values.get(k), getattr(config.TrainConfig(), k))]
    recipe = {k: getattr(cfg, k) for k in cf.values if k in shown}
    notes = [cf.report()] if cf.report() else []
    if elsewhere:
        notes.append(f"Set by this page, not the file: {', '.join(elsewhere)}.")
    text = " ".join([f"Loaded {source.name}.", *" ".join(notes).splitlines()])
    name = recipe.get("name", gr.update()) if "name" in cf.values else gr.update()
    dataset = recipe.get("dataset", gr.update()) if "dataset" in cf.values else gr.update()
    return [widgets.message_html(text, "info" if notes else "ok"), name, dataset, *fill_values(form, recipe, values)]


def build(ctx: UIContext) -> dict[str, Any]:
    cls = config.TrainConfig
    has_base_model = hasattr(ctx.host, "base_model")  # the WebUI trains the model it has loaded
    skip = SPECIAL | (set() if has_base_model else {"base_model"})
    basic = [f.name for f in forms.fields(cls, "basic", skip=skip)]
    advanced = [f.name for f in forms.fields(cls, "advanced", skip=skip)]
    form = TrainForm(basic + advanced, has_base_model)
    # The page opens on a preset, and the fields hold that preset's recipe for the model's family
    # (SDXL: 1024 px, its buckets, U-Net only), not the schema's plain (SD1.5) defaults; the tab
    # shows samples as they are made, so it turns them on (the CLI and library keep kohya's "off").
    family = model_family(ctx, getattr(ctx.host, "base_model", None))
    chosen = getattr(ctx.host, "default_preset", None) or DEFAULT_PRESET
    chosen = chosen if chosen in family.presets else DEFAULT_PRESET
    recipe = filled(family, chosen)
    defaults = {n: getattr(recipe, n) for n in form.names}
    defaults["base_model"] = getattr(ctx.host, "base_model", None)
    start_lr = family.presets[chosen].get("lr")
    missing = [m for m in (steps.training_run(), steps.training_data()) if isinstance(m, steps.Missing)]
    if missing:
        gr.HTML(widgets.message_html(missing[0].message(), "missing"))
    with gr.Row():
        with gr.Column(scale=2):
            preset = gr.Radio(preset_choices(ctx), value=chosen, label="Preset",
                              info="fills the recipe for a kind of LoRA; yours are listed after the built-in ones",
                              elem_id=ID + "preset")
            shown = gr.State(family.name)  # the family the controls were filled for
            family_md = gr.Markdown(family_text(family), elem_id=ID + "family")
            with gr.Row():
                preset_name = gr.Textbox(label="Preset name", info="save the form's recipe under this name",
                                         elem_id=ID + "preset_name")
                save_preset_btn = gr.Button("Save preset", elem_id=ID + "save_preset")
            name = gr.Textbox(label="LoRA name", info="file name and trigger word; any language",
                              elem_id=ID + "name")
            dataset = gr.Textbox(label="Dataset folder", info="the folder of training images; Prepare fills it in",
                                 elem_id=ID + "dataset")
            with gr.Row():
                lr_mode = gr.Radio(["auto", "manual"], value="manual" if start_lr not in (None, "auto") else "auto",
                                   label="Learning rate", info="auto: a short D-Adaptation probe finds it first",
                                   elem_id=ID + "lr_mode")
                lr_value = gr.Textbox(value=str(start_lr) if start_lr not in (None, "auto") else "1e-4",
                                      label="Learning rate value", elem_id=ID + "lr_value")
            controls: dict[str, Any] = {}
            repeats_md = None
            for row in ROWS:
                present = [n for n in row if n in basic]
                if present:
                    with gr.Row():
                        controls.update(forms.build(cls, present, defaults, ID))
                    if "repeats" in present:  # which repeat count is used, in words, beside the field
                        repeats_md = gr.Markdown("", elem_id=ID + "repeats_note")
            rest = [n for n in basic if n not in controls]
            controls.update(forms.build(cls, rest, defaults, ID))
            steps_md = gr.Markdown("Choose a dataset folder to see the step count.", elem_id=ID + "steps")
            with gr.Accordion("Advanced", open=False, elem_id=ID + "advanced"):
                controls.update(forms.build(cls, advanced, defaults, ID))
            with gr.Row():
                config_path = gr.Textbox(label="Config file", elem_id=ID + "config_path",
                                         info="a .toml or .json: ours, a run folder's config.json, or kohya's")
                load_config_btn = gr.Button("Load config", elem_id=ID + "load_config")
                save_config_btn = gr.Button("Save config", elem_id=ID + "save_config")
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id=ID + "start")
                stop = gr.Button("Stop", variant="stop", elem_id=ID + "stop")
            status = gr.HTML(elem_id=ID + "status")  # beside the buttons: progress, errors, warnings
        with gr.Column(scale=3):
            loss = gr.Image(label="Loss", type="pil", interactive=False, elem_id=ID + "loss")
            with gr.Row():
                probe = gr.Image(label="Learning-rate probe", type="pil", interactive=False, elem_id=ID + "probe")
                samples = gr.Gallery(label="Samples", columns=3, height=260, elem_id=ID + "samples")
            result = gr.Textbox(label="Result", interactive=False, elem_id=ID + "result")
            meta = gr.Dataframe(headers=["metadata", "value"], value=[["", ""]], label="LoRA metadata",
                                interactive=False, elem_id=ID + "meta")
    lora_name = gr.State("")
    inputs = [controls[n] for n in form.names]

    plan_outputs = [steps_md] + ([repeats_md] if repeats_md is not None else [])

    def _steps(ds: str, mode: str, fam: str, *vals: Any) -> Any:
        texts = plan_texts(ctx, form, ds, list(vals), mode, family_by_name(fam) if fam else SD15)
        return list(texts[:len(plan_outputs)])

    plan_inputs = [dataset, lr_mode, *(controls[n] for n in STEP_FIELDS if n in controls), *(controls[n] for n in (
        "resolution", "enable_buckets", "bucket_no_upscale", "batch_size", "base_model", "device",
        "probe_fraction", "probe_min_steps", "probe_max_steps", "subsets", "reg_data_dir") if n in controls)]
    for comp in dict.fromkeys(plan_inputs):
        comp.change(_steps, [dataset, lr_mode, shown, *inputs], plan_outputs, **compat.event_kwargs())
    preset.change(lambda p, fam, *v: preset_values(form, p, *v, ctx=ctx, family=family_by_name(fam) if fam else SD15),
                  [preset, shown, *inputs], [lr_mode, lr_value, *inputs])
    save_preset_btn.click(lambda *a: save_preset(ctx, form, *a), [preset_name, lr_mode, lr_value, *inputs],
                          [status, preset])
    save_config_btn.click(lambda *a: save_config(ctx, form, *a), [config_path, name, dataset, lr_mode, lr_value,
                                                                 *inputs], [status])
    load_config_btn.click(lambda *a: load_config(ctx, form, *a), [config_path, *inputs],
                          [status, name, dataset, lr_mode, lr_value, *inputs])

    def _family(fam: str, p: str, *vals: Any) -> list[Any]:
        base_model = vals[form.names.index("base_model")] if form.has_base_model else None
        return family_values(ctx, form, fam, p, base_model, *vals)

    family_io = ([shown, preset, *inputs], [shown, family_md, *inputs])
    if "base_model" in controls:  # a chosen model of another family refills what the user left as filled
        controls["base_model"].change(_family, *family_io, **compat.event_kwargs())

    run_inputs = [name, dataset, lr_mode, lr_value, *inputs]
    ctx.remember(*run_inputs)

    def _run_kept(*args: Any) -> Iterator[tuple]:
        kept, (p, fam) = args[:-2], args[-2:]
        ctx.keep(run_inputs, kept)
        yield from run_train(ctx, form, *kept, preset=p, shown=fam)

    outputs = [status, loss, probe, samples, result, meta, lora_name, start]
    event = start.click(_run_kept, [*run_inputs, preset, shown], outputs, **compat.event_kwargs())
    stop.click(stop_handler(ctx.runner, TAB, STOPPED), None, [status], **compat.event_kwargs())
    return dict(form=form, preset=preset, shown=shown, family=family_md, preset_name=preset_name,
                save_preset=save_preset_btn, config_path=config_path, load_config=load_config_btn,
                save_config=save_config_btn, name=name, dataset=dataset, lr_mode=lr_mode, lr_value=lr_value,
                controls=controls, steps=steps_md, repeats_note=repeats_md, start=start, stop=stop, status=status,
                loss=loss, probe=probe, samples=samples, result=result, meta=meta, lora_name=lora_name, event=event,
                outputs=outputs, reattach=functools.partial(reattach, ctx),
                # on page load: the host's loaded checkpoint may be of another family than at the page's making
                refresh=(_family, *family_io))
