"""The whole Fast LoRA tab under the WebUI's ui-config.json rules (the fake
modules/ui_loadsave.py restates AUTOMATIC1111 v1.10.1's, commit 82a973c04367123ae98bd9abdf80d9eda9b910e2).

The WebUI keys every component's saved default by its tab and label alone ("fast_lora/Batch size/value"),
so two components with one label share one default: the first one registered sets the other's.
Every component must have its own key, and every default must survive a save and a reload unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib

import pytest


@pytest.fixture
def tab(webui):
    """(blocks, UIContext) as the WebUI gets them from our on_ui_tabs callback."""
    from lib_lora.hosts import webui_app

    blocks, title, ifid = webui_app.ui_tabs()[0]
    assert ifid == "fast_lora"
    return blocks, blocks.fast_lora


def register(blocks, filename):
    """What modules/ui.py does for our tab: add_block(interface, ifid); dump when anything is new."""
    loadsave = importlib.import_module("modules.ui_loadsave").UiLoadsave(str(filename))
    before = dict(loadsave.ui_settings)
    loadsave.add_block(blocks, "fast_lora")
    if loadsave.ui_settings != before:
        loadsave.dump_defaults()
    return loadsave


def leaves(block):
    for child in getattr(block, "children", []):
        yield from leaves(child)
    if not hasattr(block, "children"):
        yield block


def values(blocks):
    return {id(c): getattr(c, "value", None) for c in leaves(blocks)}


def same(a, b) -> bool:
    """Equal as the page shows them: the WebUI hands a saved Number back as a float."""
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def test_every_component_has_its_own_key(tab, tmp_path):
    blocks, ctx = tab
    loadsave = register(blocks, tmp_path / "ui-config.json")
    # Defaults that follow the host (work folder, newest LoRA, language) are not pinned by the first start.
    saved = {id(c) for _, c in loadsave.registered}
    for comp in (ctx.parts["prepare"]["controls"]["out"], ctx.parts["test"]["lora"], ctx.parts["edit"]["show_zh"]):
        assert id(comp) not in saved, comp.elem_id
    owners = collections.defaultdict(set)
    for key, comp in loadsave.registered:
        owners[key].add(id(comp))
    shared = {k: len(v) for k, v in owners.items() if len(v) > 1}
    assert not shared, f"keys shared by several components: {shared}"
    # The Train tab's batch size and the Test tab's seed are each saved under a key of their own.
    keys = {key for key, _ in loadsave.registered}
    assert any(k.endswith("/Batch size/value") for k in keys) and any(k.endswith("/Seed/value") for k in keys)


def test_defaults_survive_the_first_start_and_a_reload(tab, tmp_path, webui):
    from lib_lora.hosts import webui_app

    blocks, _ = tab
    built = values(blocks)
    config_file = tmp_path / "ui-config.json"
    register(blocks, config_file)  # the first start writes every default
    after_first = values(blocks)
    changed = [c.elem_id or c.label for c in leaves(blocks) if not same(built[id(c)], after_first[id(c)])]
    assert not changed, f"the first start changed these defaults: {changed}"
    assert config_file.is_file()
    # A restart: a fresh tab reads ui-config.json back.
    again, _, _ = webui_app.ui_tabs()[0]
    fresh = values(again)
    register(again, config_file)
    reloaded = [c.elem_id or c.label for c in leaves(again) if not same(fresh[id(c)], c.value if hasattr(c, "value") else None)]
    assert not reloaded, f"a reload changed these defaults: {reloaded}"


def schema_expectations(ctx):
    """(tab part, config class, {field: expected default}) for the controls built from the schema."""
    from lib_lora import config
    from lib_lora.ui import steps, tab_train

    train_preset = ctx.parts["train"]["preset"].value
    train = config.apply_preset(config.TrainConfig(), train_preset) if train_preset in config.PRESETS \
        else config.TrainConfig()
    train = dataclasses.replace(train, sample_images=tab_train.UI_SAMPLE_IMAGES)  # the tab shows samples
    tag = dataclasses.replace(steps.tag_config()(), tagger="webui")  # the WebUI's own Deepbooru
    prepare = dataclasses.replace(steps.prepare_config()(), out=ctx.default_folder())  # the host's work folder
    return [("prepare", prepare), ("tag", tag), ("train", train)]


def test_every_default_is_the_schemas_after_the_webui_loads_the_tab(tab, tmp_path):
    from lib_lora.ui import forms

    blocks, ctx = tab
    register(blocks, tmp_path / "ui-config.json")
    checked = 0
    for part, expected_cfg in schema_expectations(ctx):
        controls = ctx.parts[part]["controls"]
        assert controls, part
        for name, comp in controls.items():
            want = forms.values_of(expected_cfg, [name])[0]
            got = comp.value
            if isinstance(got, str) and not isinstance(want, str):
                want = str(want)  # a Dropdown of numbers holds strings
            assert same(got, want), f"{part} {name}: {got!r}, the schema says {want!r}"
            checked += 1
    assert checked > 60
    train = ctx.parts["train"]["controls"]
    assert train["batch_size"].value == 1 and train["seed"].value == 42
    assert ctx.parts["test"]["seed"].value == 1234


def test_the_train_tab_opens_on_the_default_preset_setting(webui):
    """The setting "Default training preset" picks the preset the full Train tab opens on, with
    its values in the fields (as the REST route and the fallback tab already do)."""
    from lib_lora import config
    from lib_lora.hosts import webui_app

    webui.shared.opts.add_option("fast_lora_preset", webui.shared.OptionInfo("style"))
    webui.shared.opts.fast_lora_preset = "style"
    ctx = webui_app.ui_tabs()[0][0].fast_lora
    train = ctx.parts["train"]
    assert train["preset"].value == "style"
    controls = train["controls"]
    for name in ("dim", "repeats", "epochs", "lr_scheduler"):
        assert controls[name].value == config.PRESETS["style"][name], name
