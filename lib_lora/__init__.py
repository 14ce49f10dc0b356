"""Fast LoRA: turn a folder of photos into an SD1.5 LoRA, inside the WebUI or standalone.

The core (dataset, tagging, training) never imports gradio, a host or A1111's `modules`.
"""

__version__ = "0.1.0"
