"""The WebUI trains in its own single process: started under a multi-process launcher it says
so in one sentence and trains as one process (rank 0 of 1, the whole batch)."""

from __future__ import annotations

import pytest
from PIL import Image

from lib_lora.config import TrainConfig
from lib_lora.training import distributed


@pytest.fixture
def host(webui, webui_model):
    from lib_lora.hosts import webui as host_module

    webui.shared.sd_model = webui_model
    return host_module.WebUIHost()


def test_the_webui_says_it_trains_in_one_process_under_a_launcher(host, tmp_path, monkeypatch):
    folder = tmp_path / "data" / "2_sks"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (60 * i, 90, 30)).save(folder / f"img{i}.png")
    cfg = TrainConfig(name="sks", dataset=str(tmp_path / "data"), resolution=64, enable_buckets=False, max_steps=2,
                      dim=4, alpha=2.0, lr="1e-3", optimizer="adamw", mixed_precision="no", batch_size=2,
                      cache_latents_to_disk=False, save_precision="fp32", seed=42)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what accelerate launch / torchrun set in each process
    monkeypatch.setenv("RANK", "1")
    events: list[dict] = []
    summary = host.run_job("Training sks", host.train, cfg, on_event=events.append)
    notes = [e["text"] for e in events if e["kind"] == "phase" and e.get("level") == "warning"
             and "single process" in e["text"]]
    assert notes == [distributed.single_process_note()]
    assert "2 processes were started" in notes[0] and "--" not in notes[0]  # the UI speaks UI: no flags
    assert summary["lora_path"] and not summary["interrupted"]  # trained alone, and wrote its LoRA
    plans = [e for e in events if e["kind"] == "plan"]
    assert plans[-1]["batch_size"] == 2  # the config's batch, not a global batch of 2 x 2


def test_no_sentence_in_a_plain_start(monkeypatch):
    for var in distributed.WORLD_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    assert distributed.single_process_note() is None
    assert distributed.launched_processes({"WORLD_SIZE": "4"}) == 4
    assert distributed.single_process_note(asked=3) is not None
