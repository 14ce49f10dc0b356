"""AUTOMATIC1111 entry point: registers the Fast LoRA tab, its settings and its REST routes.

Glue only; everything else lives in lib_lora (the WebUI puts this extension's folder on
sys.path while it loads scripts, so the package is imported here, at module top level).
"""

from modules import script_callbacks

from lib_lora.hosts import webui_app

script_callbacks.on_ui_tabs(webui_app.ui_tabs)
script_callbacks.on_ui_settings(webui_app.add_settings)
script_callbacks.on_app_started(webui_app.on_app_started)
