"""Mirrors modules/ui_components.py: the two classes ui_loadsave.py looks for (ToolButton, a
gr.Button subclass; InputAccordion, a gr.Checkbox subclass holding an `accordion`)."""
import gradio as gr


class ToolButton(gr.Button):
    pass


class InputAccordion(gr.Checkbox):
    def __init__(self, value, **kwargs):
        super().__init__(value=value, **kwargs)
        self.accordion = gr.Accordion(kwargs.get("label", "Accordion"), open=value, render=False)
