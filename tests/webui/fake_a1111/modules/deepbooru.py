"""Mirrors modules/deepbooru.py: `model` = DeepDanbooru() with start(), stop(), and
`.model` (DeepDanbooruModel: called on a (1,512,512,3) [0,1] tensor, has `.tags`).

The fake model scores tags from simple image statistics, so tests know the answer."""
import torch


class FakeDeepDanbooruModel(torch.nn.Module):
    tags = ["1girl", "long_hair", "red_background", "^_^", "rating:safe"]

    def forward(self, x):
        r = x[..., 0].mean()  # red images score "red_background"
        scores = torch.stack([torch.tensor(0.9), torch.tensor(0.6), r, torch.tensor(0.7), torch.tensor(0.99)])
        return scores.unsqueeze(0)


class DeepDanbooru:
    def __init__(self):
        self.model = None
        self.started = 0
        self.stopped = 0

    def load(self):
        if self.model is None:
            self.model = FakeDeepDanbooruModel()

    def start(self):
        self.load()
        self.started += 1

    def stop(self):
        self.stopped += 1

    def tag(self, pil_image):
        raise AssertionError("Fast LoRA reads scores through .model, not the joined tag string")


model = DeepDanbooru()
