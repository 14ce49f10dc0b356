"""By hand: the Forge WebUI check over HTTP, against a running Forge (or A1111) with this extension.

    python tests/webui/tools/forge_webui_http_check.py <dataset dir> [--url http://127.0.0.1:7871] [--out DIR]

With a SD1.5 checkpoint loaded (make_sd15_shaped_checkpoint.py writes one where no hub is
reachable): a txt2img image without a LoRA (fixed seed, 64 px, 4 steps); the Fast LoRA tab in
the page's gradio config; a training on the loaded model through POST /fastlora/v1/train
(resolution 64, 4 steps), waited for on /fastlora/v1/progress; the file in /sdapi/v1/loras; the
same seed with `<lora:name:1>`, which must differ; a second training right after that LoRA
generation (Forge has baked the LoRA into its weights) must give the same file, byte for byte,
when the server runs on one thread (OMP_NUM_THREADS=1; on more, CPU reductions may differ in
the last bit and Adam makes that visible); and the no-LoRA image again, which must be
byte-identical to the first. Prints each result; exits non-zero on the first failure.
Standard library only (runs in any Python).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import time
import urllib.request
from pathlib import Path


def call(url: str, path: str, body: dict | None = None, timeout: float = 1800) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data, {"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def txt2img(url: str, prompt: str, out: Path) -> bytes:
    body = {"prompt": prompt, "negative_prompt": "", "seed": 12345, "steps": 4, "width": 64, "height": 64,
            "cfg_scale": 7, "sampler_name": "Euler", "batch_size": 1, "n_iter": 1}
    png = base64.b64decode(call(url, "/sdapi/v1/txt2img", body)["images"][0])
    out.write_bytes(png)
    print(f"txt2img {prompt!r}: {out} sha256 {hashlib.sha256(png).hexdigest()[:16]}")
    return png


def train(url: str, name: str, dataset: str) -> dict:
    body = {"name": name, "dataset": dataset, "resolution": 64, "enable_buckets": False, "max_steps": 4, "dim": 4,
            "alpha": 2.0, "lr": "5e-3", "optimizer": "adamw", "mixed_precision": "no",
            "cache_latents_to_disk": False, "save_precision": "fp16", "seed": 42, "lr_scheduler": "constant"}
    print("POST /fastlora/v1/train:", call(url, "/fastlora/v1/train", body))
    while True:
        time.sleep(2)
        rec = call(url, "/fastlora/v1/progress")
        if rec["status"] not in ("queued", "running", "stopping"):
            break
    losses = [round(e["loss"], 6) for e in rec["events"] if e["kind"] == "loss"]
    print(f"  {rec['status']}: {rec['lora_path']} losses {losses} {rec['error']}")
    check(rec["status"] == "done", f"training {name} ended {rec['status']}: {rec['error']}")
    return rec


def tensors(path: str) -> dict[str, bytes]:
    """A safetensors file's tensors as raw bytes by name (its metadata, which names the LoRA, left out)."""
    raw = Path(path).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    return {k: (v["dtype"], raw[8 + size + v["data_offsets"][0]:8 + size + v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"FAILED: {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--url", default="http://127.0.0.1:7871")
    parser.add_argument("--out", type=Path, default=Path("forge-check"))
    parser.add_argument("--name", default="http_check")
    args = parser.parse_args()
    url, out, name = args.url.rstrip("/"), args.out, args.name
    out.mkdir(parents=True, exist_ok=True)

    before = txt2img(url, "a photo of a cat", out / "nolora_before.png")
    tabs = [c["props"].get("label") for c in call(url, "/config")["components"]
            if c["props"].get("elem_id") == "tab_fast_lora"]
    print("Fast LoRA tab in the page:", tabs)
    check(tabs == ["Fast LoRA"], "no Fast LoRA tab in the gradio config")
    first = train(url, name, args.dataset)
    listed = [x["name"] for x in call(url, "/sdapi/v1/loras")]
    print("/sdapi/v1/loras:", listed)
    check(name in listed, f"{name} is not in Forge's LoRA list")
    with_lora = txt2img(url, f"a photo of a cat <lora:{name}:1>", out / "lora.png")
    check(with_lora != before, "the LoRA did not change the image")
    second = train(url, name + "_again", args.dataset)  # right after a generation that baked the LoRA in
    same = tensors(first["lora_path"]) == tensors(second["lora_path"])
    print("the LoRA trained after a <lora:…> generation has the first one's tensors, byte for byte:", same,
          "(expected True when the server runs on one thread)")
    after = txt2img(url, "a photo of a cat", out / "nolora_after.png")
    print("no-LoRA image byte-identical before and after:", after == before)
    check(after == before, "the no-LoRA image changed")


if __name__ == "__main__":
    main()
