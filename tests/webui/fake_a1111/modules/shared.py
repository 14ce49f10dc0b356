"""Mirrors modules/shared.py: cmd_opts, opts, state, sd_model, OptionInfo."""
import argparse

from modules.options import OptionInfo, Options  # noqa: F401  (shared re-exports OptionInfo)
from modules.shared_state import State

# The flags we read, with modules/cmd_args.py's defaults (--lora-dir is the Lora extension's preload.py).
cmd_opts = argparse.Namespace(lowvram=False, medvram=False, lora_dir="models/Lora", no_half=True, ckpt_dir=None,
                              share=False, listen=False, ngrok=None, server_name=None, api_auth=None)
opts = Options({
    # defaults as in modules/shared_options.py
    "training_xattention_optimizations": OptionInfo(False, "Use cross attention optimizations while training"),
    "interrogate_deepbooru_score_threshold": OptionInfo(0.5, "deepbooru: score threshold"),
    "deepbooru_use_spaces": OptionInfo(True, "deepbooru: use spaces in tags"),
    "interrogate_keep_models_in_memory": OptionInfo(False, "Keep models in VRAM"),
})
state = State()
sd_model = None
