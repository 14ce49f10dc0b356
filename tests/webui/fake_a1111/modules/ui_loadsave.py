"""The rules of modules/ui_loadsave.py (UiLoadsave) in AUTOMATIC1111 v1.10.1, commit 82a973c0
(82a973c04367123ae98bd9abdf80d9eda9b910e2; Forge's copy at c3e17f05 keeps the same rules),
restated for tests. modules/ui.py calls `add_block(interface, ifid)` for every tab (ifid is the
tab's id, "fast_lora" for ours) and `dump_defaults()` when anything new was registered.

- add_block walks the block tree: a block with children is descended into (a gr.Tabs with an
  elem_id registers itself first as "<path>/Tabs@<elem_id>"); the path is NOT extended, so
  every component of a tab shares the tab's path. A leaf with a label registers as
  "<path>/<label>"; a gr.Button without a label as "<path>/<value>".
- add_component stores one key per field, "<path>/<field>", prefixed with
  "customscript/<source>/" when the component has `custom_script_source`, and skipped when it
  has `do_not_save_to_config`. Fields by *exact* type: 'visible' (Slider, Radio, Checkbox,
  Textbox, Number, Dropdown, ToolButton, Button; only when visible), 'value' (Slider, Radio,
  Checkbox, Textbox, Number, Dropdown; also Slider minimum/maximum/step), 'selected' (Tabs).
- apply_field: with no value under the key yet, the component's current value is stored
  there; otherwise the stored value is set on the component (Textbox: as str; Number: as
  float; Radio/Dropdown: only when it is one of the choices; Tabs: only a valid tab).
  So a second component under an existing key takes the first one's value.
- component_mapping keeps the first component seen per 'value' key (the defaults editor).

`registered` (test-only bookkeeping, not in the WebUI) lists every (key, component) pair.
"""
import json
import os

import gradio as gr

from modules import errors
from modules.ui_components import InputAccordion, ToolButton


def radio_choices(comp):
    # gradio 3.41 holds choices as (label, value) pairs
    return [c[0] if isinstance(c, tuple) else c for c in getattr(comp, "choices", None) or []]


class UiLoadsave:
    def __init__(self, filename):
        self.filename = filename
        self.ui_settings = {}
        self.component_mapping = {}
        self.error_loading = False
        self.registered = []
        try:
            if os.path.exists(filename):
                with open(filename, encoding="utf8") as fh:
                    self.ui_settings = json.load(fh)
        except Exception as e:  # noqa: BLE001 - as the WebUI: report and start with no saved values
            self.error_loading = True
            errors.display(e, "loading settings")

    def add_component(self, path, x):
        def apply_field(obj, field, condition=None):
            key = f"{path}/{field}"
            source = getattr(obj, "custom_script_source", None)
            if source is not None:
                key = f"customscript/{source}/{key}"
            if getattr(obj, "do_not_save_to_config", False):
                return
            self.registered.append((key, obj))
            saved = self.ui_settings.get(key)
            if isinstance(obj, gr.Accordion) and isinstance(x, InputAccordion) and field == "value":
                field = "open"
            if saved is None:
                self.ui_settings[key] = getattr(obj, field)
            elif condition is None or condition(saved):
                if isinstance(obj, gr.Textbox) and field == "value":
                    saved = str(saved)
                elif isinstance(obj, gr.Number) and field == "value":
                    try:
                        saved = float(saved)
                    except ValueError:
                        return
                setattr(obj, field, saved)
            if field == "value" and key not in self.component_mapping:
                self.component_mapping[key] = obj

        kind = type(x)
        if kind in (gr.Slider, gr.Radio, gr.Checkbox, gr.Textbox, gr.Number, gr.Dropdown, ToolButton, gr.Button) \
                and x.visible:
            apply_field(x, "visible")
        if kind is gr.Slider:
            for field in ("value", "minimum", "maximum", "step"):
                apply_field(x, field)
        if kind is gr.Radio:
            apply_field(x, "value", lambda v: v in radio_choices(x))
        if kind in (gr.Checkbox, gr.Textbox, gr.Number):
            apply_field(x, "value")
        if kind is gr.Dropdown:
            def in_choices(v):
                choices = radio_choices(x)
                return all(i in choices for i in v) if getattr(x, "multiselect", False) else v in choices

            apply_field(x, "value", in_choices)
        if kind is InputAccordion:
            if x.accordion.visible:
                apply_field(x.accordion, "visible")
            apply_field(x, "value")
            apply_field(x.accordion, "value")
        if kind is gr.Tabs:
            def valid_tab(tab_id):
                items = [c for c in x.children if isinstance(c, gr.TabItem)]
                if isinstance(tab_id, str):
                    return tab_id in [t.id for t in items]
                return isinstance(tab_id, int) and 0 <= tab_id < len(items)

            apply_field(x, "selected", valid_tab)

    def add_block(self, x, path=""):
        if hasattr(x, "children"):
            if isinstance(x, gr.Tabs) and x.elem_id is not None:
                self.add_component(f"{path}/Tabs@{x.elem_id}", x)
            for child in x.children:
                self.add_block(child, path)
        elif x.label is not None:
            self.add_component(f"{path}/{x.label}", x)
        elif isinstance(x, gr.Button) and x.value is not None:
            self.add_component(f"{path}/{x.value}", x)

    def dump_defaults(self):
        if self.error_loading and os.path.exists(self.filename):
            return
        with open(self.filename, "w", encoding="utf8") as fh:
            json.dump(self.ui_settings, fh, indent=4, ensure_ascii=False)
