"""LyCORIS network types in the trainer: they learn, resume exactly, leave the host as it was,
and their files say what they are. (How the WebUI loads the files: tests/webui/test_webui_lycoris_files.py.)"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from progress_helpers import StopAt

from lib_lora.config import TrainConfig
from lib_lora.errors import Cancelled
from lib_lora.training import state
from lib_lora.training.export import read_lora
from lib_lora.training.lycoris_net import LycorisKohyaNetwork, make_network
from lib_lora.training.run import Trainer, train

pytest.importorskip("lycoris")

TYPES = ["locon", "loha", "lokr", "dora"]
# The part of each type that starts at zero (so a fresh network adds nothing) and must move.
ZERO_AT_START = {"locon": ("lora_up.weight",), "dora": ("lora_up.weight",), "loha": ("hada_w2_a",),
                 "lokr": ("lokr_w2", "lokr_w2_b")}  # LoKr: the full w2 on small layers, else w2_a x w2_b


def _cfg(tmp_path, dataset, kind, **kw) -> TrainConfig:
    base = dict(
        name=f"lyco_{kind}", dataset=str(dataset), output_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"),
        resolution=64, dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0, lr="1e-3", optimizer="adamw",
        lr_scheduler="constant", device="cpu", max_steps=4, network_type=kind, save_precision="fp32",
    )
    base.update(kw)
    return TrainConfig(**base)


def _host_hash(bb) -> str:
    h = hashlib.sha256()
    for part in (bb.unet, bb.text_encoder):
        for name, t in sorted(part.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("kind", TYPES)
def test_each_type_trains_and_leaves_the_host_exact(kind, tmp_path, drawn_dataset, tiny_backbone):
    before = _host_hash(tiny_backbone)
    targets = tiny_backbone.lora_targets(conv=True)
    res = train(_cfg(tmp_path, drawn_dataset, kind), backbone=tiny_backbone)
    assert res.steps == 4 and torch.isfinite(torch.tensor(res.final_loss))
    tensors, md = read_lora(res.lora_path)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    # Every target got its module (LoCon and the others on the 3x3 convs too, at conv dim 2).
    assert {k.partition(".")[0] for k in tensors} == {t.name for t in targets}
    moved = [k for k in tensors if k.partition(".")[2] in ZERO_AT_START[kind]]
    assert len(moved) == len(targets) and any(tensors[k].abs().sum() > 0 for k in moved), "training changed nothing"
    # The host's model: the same bytes, and no attribute left on its modules.
    assert _host_hash(tiny_backbone) == before
    for t in targets:
        assert not [k for k in vars(t.module) if k == "forward" or k.startswith("_lycoris")], t.name
    # Metadata as kohya's sd-scripts writes it for --network_module lycoris.kohya.
    assert md["ss_network_module"] == "lycoris.kohya"
    args = json.loads(md["ss_network_args"])
    expected = {"algo": {"dora": "locon"}.get(kind, kind), "conv_dim": "2", "conv_alpha": "1.0"}
    expected |= {"lokr": {"factor": "-1"}, "dora": {"dora_wd": "True", "wd_on_output": "False"}}.get(kind, {})
    assert args == expected
    # The standalone Test tab rebuilds the network from the file (its metadata gives the layout).
    from lib_lora.hosts.standalone import LoadedLoras

    loaded = LoadedLoras(tiny_backbone).network(res.lora_path)
    assert isinstance(loaded, LycorisKohyaNetwork) and loaded.network_type == kind
    again = loaded.state_dict_kohya()
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    # Exported atomically: the finished file (and its card) and nothing half-written beside it.
    stem = res.lora_path.stem
    assert sorted(p.name for p in res.lora_path.parent.iterdir()) == [f"{stem}.json", f"{stem}.safetensors"]


def test_plain_lora_stays_our_own_network(tiny_backbone):
    from lib_lora.training.lora import LoRANetwork

    targets = tiny_backbone.lora_targets()
    cfg = TrainConfig(name="x", dataset="", dim=4, alpha=2.0)
    assert cfg.network_type == "lora"
    assert type(make_network(targets, cfg)) is LoRANetwork


def test_dora_starts_at_the_host_weight_norms(tiny_backbone):
    """DoRA's magnitude starts at the norm of each input column of W (the axis the WebUI uses)."""
    targets = [t for t in tiny_backbone.lora_targets() if not t.conv3x3][:3]
    net = LycorisKohyaNetwork(targets, "dora", dim=4, alpha=2.0)
    for t, lora in zip(targets, net.loras, strict=True):
        w = t.module.weight.detach().float()
        per_input = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        torch.testing.assert_close(lora.dora_scale.detach().reshape(-1), per_input)


def test_state_dict_holds_the_parameters_themselves(tiny_backbone):
    """The LR probe and the run state copy values back into what state_dict() returns."""
    net = LycorisKohyaNetwork(tiny_backbone.lora_targets()[:4], "locon", dim=4, alpha=2.0)
    params = {p.data_ptr() for p in net.parameters()}
    sd = net.state_dict()
    assert all(k.split(".")[0] in net.names() for k in sd)
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert ups and all(v.data_ptr() in params for v in ups)  # the parameters' storage, not products
    with torch.no_grad():
        for v in ups:
            v.fill_(0.5)
    assert all((p == 0.5).all() for n, p in net.named_parameters() if n.endswith("lora_up.weight"))
    again = LycorisKohyaNetwork(tiny_backbone.lora_targets()[:4], "locon", dim=4, alpha=2.0)
    again.load_kohya(net.state_dict_kohya())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values(), strict=True))



@pytest.mark.parametrize("kind", ["loha", "dora"])
def test_resume_is_byte_identical(kind, tmp_path, drawn_dataset, tiny_backbone, one_thread):
    # Dropout draws from the RNG in LoHa (bypass mode): the resumed run must restore it too.
    ref = train(_cfg(tmp_path / "a", drawn_dataset, kind, max_steps=6, network_dropout=0.1), backbone=tiny_backbone)
    cfg = _cfg(tmp_path / "b", drawn_dataset, kind, max_steps=6, network_dropout=0.1, state_every_n_steps=2)
    with pytest.raises(Cancelled):
        train(cfg, progress=StopAt(3), backbone=tiny_backbone)
    assert state.load_state(state.state_path(cfg.run_dir))["step"] == 3
    res = train(cfg, backbone=tiny_backbone)
    assert res.steps == 6
    a, b = read_lora(ref.lora_path)[0], read_lora(res.lora_path)[0]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_trainer_optimises_the_lycoris_parameters(tmp_path, drawn_dataset, tiny_backbone):
    tr = Trainer(_cfg(tmp_path, drawn_dataset, "loha", train_text_encoder=False), backbone=tiny_backbone)
    tr.state.session_id = "test"
    tr.setup()
    try:
        assert isinstance(tr.state.network, LycorisKohyaNetwork)
        assert tr.state.te_params == [] and len(tr.state.unet_params) == sum(1 for _ in tr.state.network.parameters())
        assert all(n.startswith("lora_unet_") for n in tr.state.network.names())
    finally:
        tr.close()


@pytest.fixture(scope="module")
def tiny_sdxl():
    from lib_lora.training.models_sdxl import load_backbone

    return load_backbone("tiny-sdxl")


@pytest.mark.parametrize("kind", TYPES)
def test_each_type_trains_on_sdxl_under_kohyas_names(kind, tmp_path, drawn_dataset, tiny_sdxl):
    """Both text encoders and the U-Net, 3x3 convs too: lora_unet_ / lora_te1_ / lora_te2_ names."""
    parts = (tiny_sdxl.unet, tiny_sdxl.text_encoder, tiny_sdxl.text_encoder_2)
    before = [{k: v.clone() for k, v in p.state_dict().items()} for p in parts]
    targets = tiny_sdxl.lora_targets(conv=True)
    cfg = _cfg(tmp_path, drawn_dataset, kind, base_model="tiny-sdxl", max_steps=2, train_text_encoder=True,
               min_bucket_reso=64, max_bucket_reso=128)
    res = train(cfg, backbone=tiny_sdxl)
    tensors, md = read_lora(res.lora_path)
    assert {k.partition(".")[0] for k in tensors} == {t.name for t in targets}
    assert {t.name.split("_")[1] for t in targets} == {"unet", "te1", "te2"}
    moved = [k for k in tensors if k.partition(".")[2] in ZERO_AT_START[kind]]
    assert any(tensors[k].abs().sum() > 0 for k in moved if k.startswith("lora_unet_")), "the U-Net did not train"
    assert any(tensors[k].abs().sum() > 0 for k in moved if k.startswith("lora_te2_")), "text encoder 2 did not train"
    assert md["ss_network_module"] == "lycoris.kohya" and md["ss_base_model_version"] == "sdxl_base_v1-0"
    for part, ref in zip(parts, before, strict=True):  # the backbone's weights: the same bytes
        assert all(torch.equal(v, ref[k]) for k, v in part.state_dict().items())
    for t in targets:
        assert not [k for k in vars(t.module) if k == "forward" or k.startswith("_lycoris")], t.name
