"""scripts/fast_lora.py and the host's `modules` calls, against the fake WebUI (no training)."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from lib_lora.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def host(webui, webui_model):
    from lib_lora.hosts import webui as host_module

    webui.shared.sd_model = webui_model
    return host_module.WebUIHost()


def load_script():
    spec = importlib.util.spec_from_file_location("fast_lora_script", ROOT / "scripts" / "fast_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_registers_tab_settings_and_routes(webui, host):
    import gradio as gr
    from fastapi import FastAPI

    load_script()
    cb = webui.script_callbacks.callback_map
    assert [len(cb[k]) for k in ("callbacks_ui_tabs", "callbacks_ui_settings", "callbacks_app_started")] == [1, 1, 1]
    webui.script_callbacks.ui_settings_callback()
    labels = webui.shared.opts.data_labels
    for key in ("fast_lora_work_dir", "fast_lora_preset"):
        assert labels[key].section == ("fast_lora", "Fast LoRA"), key
    # Tag thresholds are the Tag tab's (one config for every tagger), not WebUI settings.
    assert not {"fast_lora_tagger", "fast_lora_tag_threshold", "fast_lora_character_threshold", "fast_lora_keep_models"} & set(labels)
    assert webui.shared.opts.fast_lora_preset == "person"
    # The preview after a training: on, 512x512, 20 steps, Euler a, the sampler from the WebUI's list.
    preview = {k: webui.shared.opts.data[k] for k in labels if k.startswith("fast_lora_preview")}
    assert preview == {"fast_lora_preview": True, "fast_lora_preview_width": 512, "fast_lora_preview_height": 512,
                       "fast_lora_preview_steps": 20, "fast_lora_preview_sampler": "Euler a"}
    sampler_args = labels["fast_lora_preview_sampler"].component_args
    assert labels["fast_lora_preview_sampler"].component is gr.Dropdown
    assert "Euler a" in sampler_args()["choices"] and "LMS" not in sampler_args()["choices"]  # LMS is hidden
    tabs = webui.script_callbacks.ui_tabs_callback()
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    assert isinstance(blocks, gr.Blocks) and (title, elem_id) == ("Fast LoRA", "fast_lora")
    app = FastAPI()
    webui.script_callbacks.app_started_callback(blocks, app)
    paths = {r.path for r in app.routes}
    assert {"/fastlora/v1/train", "/fastlora/v1/progress", "/fastlora/v1/stop"} <= paths


def test_paths_follow_the_webui_options(webui, host):
    assert host.lora_dir() == webui.root / "models" / "Lora"
    assert host.work_dir() == webui.root / "fast_lora"
    webui.shared.opts.add_option("fast_lora_work_dir", webui.shared.OptionInfo(""))
    webui.shared.opts.fast_lora_work_dir = str(webui.root / "elsewhere")
    assert host.work_dir() == webui.root / "elsewhere"
    assert host.language == "en"
    webui.shared.opts.add_option("localization", webui.shared.OptionInfo("None"))
    webui.shared.opts.localization = "zh_CN"
    assert host.language == "zh"


def test_jobs_hold_the_queue_lock_one_at_a_time(webui, host):
    order = []

    def job(progress, tag, hold):
        order.append(f"start {tag}")
        progress.update(1, 2, f"half of {tag}")
        time.sleep(hold)
        order.append(f"end {tag}")
        return tag

    t = threading.Thread(target=host.run_job, args=("first", job, "a", 0.5))
    t.start()
    time.sleep(0.1)
    assert webui.call_queue.queue_lock.locked()  # a generation would wait here
    assert host.run_job("second", job, "b", 0) == "b"
    t.join()
    assert order == ["start a", "end a", "start b", "end b"]
    assert ("textinfo", "half of a") in webui.shared.state.history
    # job() is the same lock as a context manager, and re-entrant within its thread
    with host.job("outer") as progress:
        assert webui.call_queue.queue_lock.locked()
        with host.job("inner") as inner:
            assert inner is progress
        assert not progress.cancelled()
        webui.shared.state.interrupt()
        assert progress.cancelled()
    assert not webui.call_queue.queue_lock.locked() and not webui.shared.state.interrupted


def test_job_errors_come_back_as_exceptions_not_html(webui, host):
    def bad(progress):
        raise UserError("The dataset folder is empty.")

    with pytest.raises(UserError, match="empty"):
        host.run_job("bad", bad)
    assert not webui.call_queue.queue_lock.locked()


def test_deepbooru_adapter_gives_scores_per_image(webui, host):
    tagger = host.tagger(0.5)
    assert tagger.name.startswith("deepbooru")
    red, blue = Image.new("RGB", (300, 200), (250, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 250))
    tags = tagger.tag_images([red, blue])
    # The model's own names, ratings included, like the ONNX taggers: the caption step decides.
    assert set(tags[0]) == {"1girl", "long_hair", "red_background", "^_^", "rating:safe"}
    assert set(tags[1]) == {"1girl", "long_hair", "^_^", "rating:safe"}
    assert tags[0]["1girl"] == pytest.approx(0.9)
    assert webui.deepbooru.model.started == webui.deepbooru.model.stopped == 1
    assert set(type(tagger)(threshold=0.8).tag_images([red])[0]) == {"1girl", "red_background", "rating:safe"}


def test_tag_tab_with_webui_deepbooru_follows_the_config(webui, host, tmp_path):
    """The Tag tab's webui tagger keeps what the config asks for: its threshold (not the WebUI's
    interrogate threshold of 0.5) and its underscore choice."""
    from lib_lora.config import TagConfig, validate
    from lib_lora.tagging.captions import tag_dataset
    from lib_lora.ui.context import UIContext
    from lib_lora.ui.tab_tag import make_tagger

    webui.shared.opts.add_option("interrogate_deepbooru_score_threshold", webui.shared.OptionInfo(0.5))
    folder = tmp_path / "10_sks"
    folder.mkdir()
    Image.new("RGB", (64, 64), (100, 0, 0)).save(folder / "dark_red.png")  # red_background scores 100/255
    cfg = validate(TagConfig(tagger="webui", general_threshold=0.3, keep_underscores=True))
    tag_dataset(folder, make_tagger(UIContext(host=host), cfg), cfg)
    caption = (folder / "dark_red.txt").read_text(encoding="utf-8")
    assert caption == "sks, 1girl, ^_^, long_hair, red_background"


def test_test_grid_runs_through_txt2img_with_fixed_seed_and_weights(webui, host):
    lora_dir = host.lora_dir()
    lora_dir.mkdir(parents=True)
    (lora_dir / "sks.safetensors").write_bytes(b"")
    host.after_save(lora_dir / "sks.safetensors")
    assert "sks" in webui.networks.available_networks
    # The Test tab's sampler choice: the WebUI's visible samplers, DPM++ 2M first, hidden ones left out.
    assert host.samplers() == ["DPM++ 2M", "DPM++ SDE", "Euler a", "Euler", "Heun", "DDIM", "UniPC"]
    grid, prompts = host.run_job("grid", host.test_grid, "sks", ["sks", "sks, smile"], 77, width=64, height=64,
                                 sampler_name="DDIM")  # fmt: skip
    assert grid.size == (4 * 64, 2 * 64)
    assert prompts[:4] == [f"sks, <lora:sks:{w}>" for w in ("0", "0.5", "0.75", "1")]
    call = webui.processing.calls[-1]
    assert call["seeds"] == [77] * 8 and call["prompts"] == prompts and call["sampler"] == "DDIM"
    # weight 0 and weight 1 differ (the fake colours images by prompt)
    assert grid.getpixel((10, 10)) != grid.getpixel((3 * 64 + 10, 10))


def test_grid_prompts_come_from_the_dataset_tags(tmp_path):
    from lib_lora.hosts.webui import grid_prompts

    d = tmp_path / "10_sks"
    d.mkdir()
    for i, cap in enumerate(["sks, 1girl, smile, red hair", "sks, 1girl, smile", "sks, 1girl, hat"]):
        (d / f"{i}.txt").write_text(cap, encoding="utf-8")
    prompts = grid_prompts("sks", tmp_path, n=2, tags_per_prompt=2)
    assert prompts == ["sks", "sks, 1girl, smile"]


def test_card_and_preview_files(tmp_path):
    import json

    import torch

    from lib_lora.hosts.webui import write_card, write_preview
    from lib_lora.training.export import write_lora

    meta = {"ss_output_name": "张娜英", "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
            "ss_new_sd_model_hash": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
            "ss_steps": "1050", "ss_num_train_images": "1050", "ss_network_dim": "128", "ss_network_alpha": "64.0",
            "ss_text_encoder_lr": "None", "ss_seed": "42"}
    lora = write_lora(tmp_path / "张娜英.safetensors", {"x.alpha": torch.tensor(1.0)}, meta)
    card_path = write_card(lora)
    assert card_path.name == "张娜英.json"
    c = json.loads(card_path.read_text(encoding="utf-8"))
    assert c["sd version"] == "SD1" and c["activation text"] == "张娜英" and c["preferred weight"] == 1.0
    assert "v1-5-pruned-emaonly.safetensors [6ce0161689]" in c["description"] and "1050 steps" in c["description"]
    assert "network dim 128" in c["notes"] and "text encoder lr" not in c["notes"]
    assert write_preview(lora, Image.new("RGB", (8, 8))).name == "张娜英.preview.png"


def test_rest_routes_start_report_and_refuse_a_second_job(webui, host, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_lora.hosts import webui_app

    release = threading.Event()
    requests = []

    def fake_train(progress, cfg, on_event=None, given=None, preset=None):  # the loop is tested elsewhere
        requests.append((set(given), preset))  # the route passes on what the body gave, for the family's defaults
        progress.update(1, 10, "loss 0.1")
        release.wait(5)
        if progress.cancelled():
            return {"interrupted": True, "lora_path": ""}
        return {"interrupted": False, "lora_path": f"/x/{cfg.name}.safetensors"}

    monkeypatch.setattr(host, "train", fake_train)
    app = FastAPI()
    webui_app.mount_api(app, host)
    client = TestClient(app)
    assert client.post("/fastlora/v1/train", json={"name": "a"}).status_code == 400  # no dataset
    assert "Unknown training option" in client.post("/fastlora/v1/train", json={"name": "a", "dataset": "d", "bogus": 1}).json()["detail"]
    r = client.post("/fastlora/v1/train", json={"name": "sks", "dataset": "/data", "max_steps": 10})
    for _ in range(100):
        if requests:
            break
        time.sleep(0.02)
    assert requests[0][0] == {"name", "dataset", "max_steps"}
    assert r.status_code == 200 and r.json()["status"] == "queued"
    assert client.post("/fastlora/v1/train", json={"name": "b", "dataset": "/d"}).status_code == 409
    for _ in range(100):
        p = client.get("/fastlora/v1/progress").json()
        if p["status"] == "running" and p["total"] == 10:
            break
        time.sleep(0.05)
    assert p["status"] == "running" and p["step"] == 1 and p["text"] == "loss 0.1"
    assert client.post("/fastlora/v1/stop").json()["stopping"] is True
    release.set()
    for _ in range(100):
        p = client.get("/fastlora/v1/progress").json()
        if p["status"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    assert p["status"] == "interrupted"
    # a fresh job after that one ends
    r = client.post("/fastlora/v1/train", json={"name": "sks2", "dataset": "/data"})
    assert r.status_code == 200
    for _ in range(100):
        p = client.get("/fastlora/v1/progress").json()
        if p["status"] == "done":
            break
        time.sleep(0.05)
    assert p["status"] == "done" and p["lora_path"] == "/x/sks2.safetensors"


def test_forge_tab_loads_and_train_says_why(webui, host, webui_model):
    webui_model.forge_objects = object()
    from lib_lora.hosts import webui_app

    tabs = webui_app.ui_tabs()
    assert tabs and tabs[0][1] == "Fast LoRA"
    from lib_lora.config import TrainConfig

    with pytest.raises(UserError, match="Forge"):
        host.run_job("t", host.train, TrainConfig(name="x", dataset="/d"))
