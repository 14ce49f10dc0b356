"""Helpers shared by the UI handler tests: the Train tab's form and its control values."""

from __future__ import annotations

from lib_lora import config
from lib_lora.ui import forms, tab_train


def train_form() -> tab_train.TrainForm:
    """The Train tab's controls, in the tab's order, with a base-model field."""
    basic = [f.name for f in forms.fields(config.TrainConfig, "basic", skip=tab_train.SPECIAL)]
    advanced = [f.name for f in forms.fields(config.TrainConfig, "advanced", skip=tab_train.SPECIAL)]
    return tab_train.TrainForm(basic + advanced, has_base_model=True)


def form_values(form: tab_train.TrainForm, **changes) -> list:
    """The controls' values for the schema's defaults, with `changes` applied."""
    values = dict(zip(form.names, forms.values_of(config.TrainConfig(), form.names), strict=True))
    values.update(changes)
    return [values[n] for n in form.names]
