"""Mirrors modules/paths.py (paths_internal): models_path, data_path. Tests set them."""
models_path = "models"
data_path = "."
script_path = "."
