"""What the tabs say: one phase and one loss while training, the probe's steps and a measured
time estimate before Start, which repeat count is used and why, the selected preset's values
from the start, the Test tab's README weights and one prompt placeholder.

These run under both gradio 3.41 (main env) and gradio 4 (.venv-gradio4)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from helpers_ui import form_values, train_form
from PIL import Image

from lib_lora import config
from lib_lora.errors import UserError
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.ui import forms, tab_test, tab_train, widgets
from lib_lora.ui.context import UIContext


@pytest.fixture()
def ctx(tmp_path: Path) -> UIContext:
    host = StandaloneHost(output_dir=tmp_path / "loras", work_dir=tmp_path / "work", device="cpu")
    return UIContext(host=host)


def images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (i * 30, 90, 120)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("astro, 1girl", encoding="utf-8")
    return folder


# ---- 1. one phase label, one loss ----------------------------------------------------------------

def test_status_names_the_phase_and_the_charts_smoothed_loss() -> None:
    live = tab_train.Live()
    live.feed([{"kind": "phase", "text": "Caching latents of 4 images"},
               *({"kind": "probe", "step": i, "dlr": 1e-5 * i} for i in range(1, 4))])
    assert live.status_text("LR probe") == "LR probe · d*lr 3e-05"
    losses = [1.2, 1.0, 0.9, 1.1, 0.8, 0.7]
    live.feed([{"kind": "loss", "step": i + 1, "loss": v, "average": 5.0} for i, v in enumerate(losses)])
    text = live.status_text("training")
    # The figure is the last point of the chart's smoothed line: the mean of the last 2 of 6 values.
    assert text == f"training · smoothed loss {widgets.smoothed(losses)[-1]:.4f}" == "training · smoothed loss 0.7500"
    assert text.count("loss") == 1 and "probe" not in text and "d*lr" not in text
    assert live.status_text("making samples").startswith("making samples · ")


def test_chart_of_a_short_run_has_its_points() -> None:
    assert widgets.loss_chart([(1, 1.0), (2, 0.9)]) is not None
    assert widgets.smoothed([1.0, 3.0]) == [1.0, 2.0]


# ---- 2. probe + training steps, a measured estimate ----------------------------------------------

def test_plan_counts_the_probe_and_estimates_from_a_measured_run(ctx: UIContext, tmp_path: Path) -> None:
    from lib_lora.training import timing

    form = train_form()
    ds = tmp_path / "ds"
    images(ds / "10_astro", 4)
    vals = form_values(form)
    manual, _ = tab_train.plan_texts(ctx, form, str(ds), vals, "manual")
    assert manual.startswith("**40 steps**") and "probe" not in manual
    assert "No time estimate yet" in manual
    auto, _ = tab_train.plan_texts(ctx, form, str(ds), vals, "auto")
    budget = config.TrainConfig().probe_min_steps  # 5% of 40 is below the floor
    assert f"up to {budget} steps" in auto and f"up to **{40 + budget} steps** in all" in auto
    # A finished run on this model, device, resolution and batch size measured 6 s per step.
    cfg = form.config(ctx, "astro", str(ds), "auto", "", vals)
    old = ctx.host.work_dir() / "runs" / "earlier"
    old.mkdir(parents=True)
    timing.save(old, timing.record(cfg, timing._device_of(cfg), 6.0))
    auto, _ = tab_train.plan_texts(ctx, form, str(ds), vals, "auto")
    minutes = (40 + budget) * 6.0 / 60
    assert f"about {round(minutes)} min" in auto and "6.00 s per step" in auto and "'earlier'" in auto, auto
    # Another resolution has not been measured: no figure borrowed from it.
    other, _ = tab_train.plan_texts(ctx, form, str(ds), form_values(form, resolution=768), "auto")
    assert "No time estimate yet" in other


# ---- 5. the selected preset's values, and which repeat count is used -------------------------------

def test_the_page_opens_with_the_selected_presets_values(ctx: UIContext) -> None:
    with gr.Blocks():
        parts = tab_train.build(ctx)
    recipe = config.PRESETS[parts["preset"].value]
    assert parts["preset"].value == "person"
    for name in ("repeats", "dim", "alpha", "epochs", "optimizer", "lr_scheduler", "keep_tokens"):
        got = parts["controls"][name].value
        assert str(got) == str(recipe[name]), (name, got, recipe[name])
    assert parts["lr_mode"].value == "auto"


def test_repeats_note_says_which_value_is_used_and_why(ctx: UIContext, tmp_path: Path) -> None:
    form = train_form()
    ds = tmp_path / "ds"
    images(ds / "10_astro", 3)
    _, note = tab_train.plan_texts(ctx, form, str(ds), form_values(form, repeats=30), "manual")
    assert "Using 10 repeats from the folder name 10_astro" in note and "Repeats field (30)" in note, note
    plain = images(tmp_path / "plain", 3)
    _, note = tab_train.plan_texts(ctx, form, str(plain), form_values(form, repeats=30), "manual")
    assert note.startswith("Using 30 repeats (the Repeats field)"), note


def test_subsets_alone_plan_and_start_without_a_dataset_folder(ctx: UIContext, tmp_path: Path) -> None:
    import json

    form = train_form()
    a, b = images(tmp_path / "a", 3), images(tmp_path / "b", 2)
    subsets = json.dumps([{"image_dir": str(a), "repeats": 4}, {"image_dir": str(b), "repeats": 2}])
    values = form_values(form, repeats=30, subsets=subsets)
    text, note = tab_train.plan_texts(ctx, form, "", values, "manual")
    assert "**16 steps** = 16 images with repeats" in text, text  # 3 x 4 + 2 x 2
    assert note.startswith("Each Subsets entry gives its own repeats"), note
    cfg = form.config(ctx, "subs", "", "manual", "1e-4", values)
    assert cfg.dataset == "" and [e["image_dir"] for e in cfg.subsets] == [str(a), str(b)]
    from lib_lora.training.data import plan_steps

    assert plan_steps(cfg.dataset, cfg).describe().startswith(f"Dataset {a}, {b}: 5 images, 16 with repeats.")
    with pytest.raises(UserError, match="dataset folder is empty"):  # neither: the dataset is asked for
        form.config(ctx, "subs", "", "manual", "1e-4", form_values(form))
    assert tab_train.plan_texts(ctx, form, "", form_values(form), "manual")[0].startswith("Choose a dataset folder")
    # An empty list (any spelling) is no subsets: the dataset folder is asked for, the current folder never scanned.
    for empty in ("[ ]", " [] ", "[\n]"):
        with pytest.raises(UserError, match="dataset folder is empty"):
            form.config(ctx, "subs", "", "manual", "1e-4", form_values(form, subsets=empty))
        assert tab_train.plan_texts(ctx, form, "", form_values(form, subsets=empty), "manual")[0].startswith(
            "Choose a dataset folder")
    with pytest.raises(UserError, match="subsets"):  # not JSON: said by the config's reading
        form.config(ctx, "subs", "", "manual", "1e-4", form_values(form, subsets="[{"))


# ---- 8. Test tab: the README's weights, one placeholder -------------------------------------------

def test_test_tab_defaults_and_the_trigger_placeholder(ctx: UIContext) -> None:
    with gr.Blocks():
        parts = tab_test.build(ctx)
    assert tab_test.parse_weights(parts["weights"].value) == [0, 0.5, 0.75, 1]
    assert "{trigger}" in parts["prompts"].value and "{name}" not in parts["prompts"].value
    rows, cells = tab_test.grid_prompts("astro", "{trigger}, smile\n{name}, portrait", [1])
    assert rows == ["astro, smile", "astro, portrait"]  # an older prompt's {name} still works
    assert cells == ["astro, smile <lora:astro:1>", "astro, portrait <lora:astro:1>"]


# ---- 4. the UI speaks UI ------------------------------------------------------------------------

CORE = ("dataset", "tagging", "training", "hosts", "names.py", "config.py", "progress.py", "atomic.py", "imagefiles.py")
HOST_FLAGS = {"medvram", "lowvram", "no-deps"}  # the WebUI's and pip's own command lines, not ours


def _message_strings(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module (f-string parts too), docstrings and comments left out."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_every_flag_in_a_core_message_is_an_option_the_front_ends_can_name() -> None:
    root = Path(tab_train.__file__).resolve().parents[1]
    files = [p for c in CORE for p in ([root / c] if c.endswith(".py") else (root / c).rglob("*.py"))
             if p.name != "cli.py"]  # a CLI speaks CLI
    unknown = []
    for path in files:
        for line, text in _message_strings(path):
            for m in config.FLAG_RE.finditer(text):
                if config.option_field(m[1]) is None and m[1] not in HOST_FLAGS:
                    unknown.append(f"{path.relative_to(root)}:{line}: --{m[1]}")
    assert not unknown, unknown


def test_ui_and_rest_render_options_in_their_own_words(tmp_path: Path) -> None:
    from lib_lora.dataset.prepare import prepare_dataset
    from lib_lora.errors import UserError
    from lib_lora.names import output_file
    from lib_lora.ui import tab_prepare

    # A real warning from Prepare: a 200 px photo kept small, as the Prepare tab lists it.
    src = tmp_path / "photos"
    src.mkdir()
    Image.new("RGB", (200, 200), (120, 90, 60)).save(src / "small.png")
    report = prepare_dataset(src, config.PrepareConfig(name="astro", out=str(tmp_path / "work"), crop="center",
                                                       workers=1))
    core_text = " ".join(r.message or "" for r in report.items)
    assert "--upscale" in core_text  # the core names the option once, by its flag
    rows = tab_prepare.skipped_rows(tab_prepare.report_state(report))
    shown = " ".join(r[2] for r in rows)
    assert "“Upscale small images”" in shown and "--" not in shown, shown
    # An error, as a page message and as the REST API's detail.
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "astro.safetensors").write_bytes(b"x")
    with pytest.raises(UserError) as err:
        output_file(tmp_path / "loras", "astro", ".safetensors", overwrite=False)
    html = widgets.message_html(str(err.value), "error")
    assert "“Overwrite”" in html and "--overwrite" not in html
    assert '"overwrite"' in config.phrase_options(str(err.value), config.api_phrase)
    # Flags of other programs stay as they are.
    assert forms.ui_text("restart the WebUI without --lowvram") == "restart the WebUI without --lowvram"


# ---- 7. the Chinese page ---------------------------------------------------------------------------

def test_every_visible_text_of_every_tab_has_a_chinese_entry(ctx: UIContext) -> None:
    import json

    from lib_lora.ui.app import ROOT, build_app, build_tabs
    from lib_lora.ui.i18n import markdown_texts, ui_strings

    zh = json.loads((ROOT / "localizations" / "zh_CN.json").read_text(encoding="utf-8"))
    for blocks in (build_app(ctx.host), build_tabs(ctx.host)):
        # Labels, help lines (info), placeholders, button texts, tab titles, table headers, Markdown.
        texts = ui_strings(blocks, with_info=True, with_choices=False, with_markdown=True)
        assert len(texts) > 200
        untranslated = sorted(t for t in texts if not zh.get(t))  # "LoRA" may stay "LoRA"
        assert not untranslated, untranslated
    assert markdown_texts("# Fast LoRA\nPhotos in, a LoRA out.") == ["Fast LoRA", "Photos in, a LoRA out."]
    assert all(v.strip() for v in zh.values())


# ---- 6. the crop editor ---------------------------------------------------------------------------

def _triggers(blocks: gr.Blocks) -> list[tuple[int, str, list[int]]]:
    """(target id, event, output ids) of every event listener, under gradio 3 and 4."""
    out = []
    for dep in blocks.get_config_file()["dependencies"]:
        for t in dep["targets"]:
            target, event = (t[0], t[1]) if isinstance(t, list | tuple) else (t, dep.get("trigger"))
            out.append((target, event, list(dep["outputs"])))
    return out


def test_typed_crop_coordinates_redraw_the_box(ctx: UIContext, tmp_path: Path) -> None:
    from lib_lora.ui import tab_prepare

    with gr.Blocks() as blocks:
        parts = tab_prepare.build(ctx)
    source = parts["source"]._id
    for field in parts["box"]:
        # A typed value (or one the drag writes) changes the field: that alone redraws the source.
        assert (field._id, "change", [source]) in _triggers(blocks), field.label
    # The redraw puts the orange frame where the numbers say.
    photo = tmp_path / "p.png"
    Image.new("RGB", (400, 300), (20, 20, 20)).save(photo)
    state = {"items": [{"source": str(photo), "output": str(photo), "crop_box": [0, 0, 100, 100]}]}
    shown = tab_prepare.preview_box(state, 0, 200, 50, 380, 230)
    assert shown.getpixel((200, 140))[0] > 200 and shown.getpixel((100, 100)) == (20, 20, 20)
    # The crop editor's script learns the source size from the info line.
    assert 'data-w="400" data-h="300"' in tab_prepare.crop_info((400, 300))


def test_crop_drag_geometry_in_the_pages_script() -> None:
    import json
    import shutil
    import subprocess

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed")
    script = (Path(tab_train.__file__).resolve().parents[2] / "javascript" / "fast_lora.js").read_text(encoding="utf-8")
    probe = script + """
    console.log(JSON.stringify([
      fastLoraCropDrag([100, 100, 300, 300], "se", 50, 20, 400, 350, 8),
      fastLoraCropDrag([100, 100, 300, 300], "nw", -500, 30, 400, 350, 8),
      fastLoraCropDrag([100, 100, 300, 300], "e", -400, 0, 400, 350, 8),
      fastLoraCropDrag([100, 100, 300, 300], "n", 0, 0, 400, 350, 8),
      fastLoraCropDrag([100, 100, 300, 300], "move", 250, -500, 400, 350, 8),
      fastLoraContainRect(600, 300, 512, 384),
    ]));"""
    out = subprocess.run([node, "-e", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    se, nw, e, n, move, rect = json.loads(out)
    assert se == [100, 100, 350, 320]  # the corner follows the pointer
    assert nw == [0, 130, 300, 300]  # stops at the image's edge
    assert e == [100, 100, 108, 300]  # never narrower than 8 px, never inverted
    assert n == [100, 100, 300, 300]
    assert move == [200, 0, 400, 200]  # moved whole, kept inside
    assert rect == {"left": 100, "top": 0, "scale": 300 / 384}
