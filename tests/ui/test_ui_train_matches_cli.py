"""The standalone Train tab and `python -m lib_lora train` train the same TrainConfig for the same
request: both go through `prepare_train_config` (the tab with its host and the model it loaded,
the CLI with its flags in the host's place)."""

from __future__ import annotations

import json
from pathlib import Path

from helpers_ui import train_form
from PIL import Image

from lib_lora import config
from lib_lora.cli import main
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.ui import forms, tab_train
from lib_lora.ui.context import UIContext

REQUEST = dict(base_model="tiny", resolution=64, enable_buckets=False, max_steps=1, dim=4, alpha=2.0, lr="1e-3",
               optimizer="adamw", cache_latents_to_disk=False, save_precision="fp32", log_every_n_steps=1,
               sample_images=0, overwrite=True, restart=True, shuffle_caption=True, keep_tokens=0)


def test_the_tab_and_the_cli_train_the_same_config(tmp_path: Path) -> None:
    host = StandaloneHost(base_model="tiny", output_dir=tmp_path / "loras", work_dir=tmp_path / "work", device="cpu")
    sub = tmp_path / "data" / "2_zny"
    sub.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 90, 80, 120)).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text("zny, 1girl, smile", encoding="utf-8")
    dataset = str(sub.parent.resolve())
    request = config.TrainConfig(name="zny", dataset=dataset, **REQUEST)
    run_dir = host.work_dir() / "runs" / "zny"

    form = train_form()
    out = list(tab_train.run_train(UIContext(host=host), form, "zny", dataset, "manual", request.lr,
                                   *forms.values_of(request, form.names)))
    assert "fast-lora-msg-ok" in out[-1][0], out[-1][0]
    by_tab = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))

    # The CLI: the request's fields as flags; the host's folders and device as the flags that stand for them.
    defaults = config.TrainConfig()
    flags = [arg for k, v in config.to_dict(request).items() if k not in ("dataset", "name") and v != getattr(defaults, k)
             for arg in (config.flag_of(k), str(v).lower() if isinstance(v, bool) else str(v))]
    argv = ["train", dataset, "--name", "zny", *flags, "--output-dir", str(host.lora_dir()), "--run-dir", str(run_dir),
            "--device", "cpu"]
    assert main(argv) == 0
    by_cli = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert by_cli == by_tab
    assert by_tab["device"] == "cpu"  # what the model was loaded on, not the form's "auto"
