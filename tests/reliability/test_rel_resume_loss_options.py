"""Resume stays exact with kohya's loss and noise options on: multires noise and the offset's
random strength draw from the loop's seeded generator (saved in the state), the masks are
read again from the same files, and the resumed run ends with the same LoRA bytes."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_rel import make_dataset, tensor_bytes, tiny_config
from PIL import Image
from progress_helpers import StopAt

from lib_lora.errors import Cancelled
from lib_lora.training import state
from lib_lora.training.run import train

pytestmark = pytest.mark.usefixtures("one_thread")



def test_resume_with_loss_and_noise_options_is_byte_identical(tmp_path, bb):
    ds = make_dataset(tmp_path / "data")
    (ds / "masks").mkdir()
    for i in range(3):  # a subject in the middle of each image
        m = np.zeros((64, 64), np.uint8)
        m[16 + 4 * i : 48, 12:52] = 255
        Image.fromarray(m).save(ds / "masks" / f"img{i}.png")
    options = dict(v_parameterization=True, zero_terminal_snr=True, min_snr_gamma=5.0, loss_type="huber",
                   huber_schedule="snr", multires_noise_iterations=4, noise_offset=0.05,
                   noise_offset_random_strength=True, min_timestep=10, max_timestep=990, masked_loss=True)  # fmt: skip
    ref = train(tiny_config(tmp_path / "a", ds, **options), backbone=bb)
    cfg = tiny_config(tmp_path / "b", ds, state_every_n_steps=3, **options)
    with pytest.raises(Cancelled):
        train(cfg, progress=StopAt(5), backbone=bb)
    assert state.load_state(state.state_path(cfg.run_dir))["step"] == 5
    res = train(cfg, backbone=bb)
    assert res.steps == 12
    assert tensor_bytes(res.lora_path) == tensor_bytes(ref.lora_path)
    # The options changed the training: the plain run's LoRA differs.
    plain = train(tiny_config(tmp_path / "c", ds), backbone=bb)
    assert tensor_bytes(plain.lora_path) != tensor_bytes(ref.lora_path)
