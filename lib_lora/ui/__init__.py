"""Gradio Blocks, one module per tab, shared by the standalone app and the WebUI."""
