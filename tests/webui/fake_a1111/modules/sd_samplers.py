"""Mirrors modules/sd_samplers.py (v1.10): the visible sampler names (the settings can hide some)."""
from collections import namedtuple

SamplerData = namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])

all_samplers = [SamplerData(n, None, [], {}) for n in
                ("DPM++ 2M", "DPM++ SDE", "Euler a", "Euler", "LMS", "Heun", "DDIM", "UniPC")]
samplers = list(all_samplers)
samplers_hidden = {"LMS"}


def visible_sampler_names():
    return [x.name for x in samplers if x.name not in samplers_hidden]
