"""By hand: the Forge WebUI check over HTTP, against a running Forge (or A1111) with this extension.

    python tests/webui/tools/forge_webui_http_check.py <dataset dir> [--url http://127.0.0.1:7871] [--out DIR]
        [--model TITLE] [--size 64] [--steps 4] [--train-steps 4] [--resolution 64] [--dim 4] [--train-text-encoder] [--once]

With a SD1.5 checkpoint loaded (make_sd15_shaped_checkpoint.py writes one where no hub is
reachable): a txt2img image without a LoRA (fixed seed, 64 px, 4 steps); the Fast LoRA tab in
the page's gradio config; a training on the loaded model through POST /fastlora/v1/train
(resolution 64, 4 steps), waited for on /fastlora/v1/progress; the file in /sdapi/v1/loras; the
same seed with `<lora:name:1>`, which must differ; a second training right after that LoRA
generation (Forge has baked the LoRA into its weights) must give the same file, byte for byte,
when the server runs on one thread (OMP_NUM_THREADS=1; on more, CPU reductions may differ in
the last bit and Adam makes that visible); and the no-LoRA image again, which must be
byte-identical to the first. Prints each result; exits non-zero on the first failure.
--model first makes that checkpoint the loaded one (POST /sdapi/v1/options sd_model_checkpoint;
make_sdxl_shaped_checkpoint.py writes an SDXL one); --once leaves out the second training
(on a 2.6 B-parameter SDXL U-Net on CPU each one takes minutes).
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


def txt2img(url: str, prompt: str, out: Path, size: int = 64, steps: int = 4) -> bytes:
    body = {"prompt": prompt, "negative_prompt": "", "seed": 12345, "steps": steps, "width": size, "height": size,
            "cfg_scale": 7, "sampler_name": "Euler", "batch_size": 1, "n_iter": 1}
    start = time.time()
    png = base64.b64decode(call(url, "/sdapi/v1/txt2img", body)["images"][0])
    out.write_bytes(png)
    print(f"txt2img {prompt!r}: {out} sha256 {hashlib.sha256(png).hexdigest()[:16]} ({time.time() - start:.0f} s)",
          flush=True)
    return png


def train(url: str, name: str, dataset: str, resolution: int = 64, steps: int = 4, dim: int = 4,
          text_encoder: bool | None = None) -> dict:
    body = {"name": name, "dataset": dataset, "resolution": resolution, "enable_buckets": False, "max_steps": steps,
            "dim": dim,
            "alpha": 2.0, "lr": "5e-3", "optimizer": "adamw", "mixed_precision": "no",
            "cache_latents_to_disk": False, "save_precision": "fp16", "seed": 42, "lr_scheduler": "constant"}
    if text_encoder is not None:  # else the family's default (SDXL: off)
        body["train_text_encoder"] = text_encoder
    start = time.time()
    print("POST /fastlora/v1/train:", call(url, "/fastlora/v1/train", body), flush=True)
    while True:
        time.sleep(2)
        rec = call(url, "/fastlora/v1/progress")
        if rec["status"] not in ("queued", "running", "stopping"):
            break
    losses = [round(e["loss"], 6) for e in rec["events"] if e["kind"] == "loss"]
    print(f"  {rec['status']}: {rec['lora_path']} losses {losses} {rec['error']} ({time.time() - start:.0f} s)",
          flush=True)
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
    parser.add_argument("--model", help="checkpoint title to load first (sd_model_checkpoint)")
    parser.add_argument("--size", type=int, default=64, help="txt2img width and height")
    parser.add_argument("--steps", type=int, default=4, help="txt2img sampling steps")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64, help="training resolution")
    parser.add_argument("--dim", type=int, default=4)
    parser.add_argument("--train-text-encoder", action="store_true", default=None,
                        help="train the text encoders too (SDXL's default is the U-Net alone)")
    parser.add_argument("--once", action="store_true", help="no second training after the LoRA generation")
    args = parser.parse_args()
    url, out, name = args.url.rstrip("/"), args.out, args.name
    out.mkdir(parents=True, exist_ok=True)

    def gen(prompt: str, file: str) -> bytes:
        return txt2img(url, prompt, out / file, args.size, args.steps)

    def run(run_name: str) -> dict:
        return train(url, run_name, args.dataset, args.resolution, args.train_steps, args.dim,
                     args.train_text_encoder)

    if args.model:
        start = time.time()
        call(url, "/sdapi/v1/options", {"sd_model_checkpoint": args.model})
        loaded = call(url, "/sdapi/v1/options")["sd_model_checkpoint"]
        print(f"sd_model_checkpoint: {loaded} ({time.time() - start:.0f} s)", flush=True)
        check(args.model in loaded, f"the loaded checkpoint is {loaded}, not {args.model}")
    before = gen("a photo of a cat", "nolora_before.png")
    tabs = [c["props"].get("label") for c in call(url, "/config")["components"]
            if c["props"].get("elem_id") == "tab_fast_lora"]
    print("Fast LoRA tab in the page:", tabs)
    check(tabs == ["Fast LoRA"], "no Fast LoRA tab in the gradio config")
    first = run(name)
    listed = [x["name"] for x in call(url, "/sdapi/v1/loras")]
    print("/sdapi/v1/loras:", listed)
    check(name in listed, f"{name} is not in Forge's LoRA list")
    with_lora = gen(f"a photo of a cat <lora:{name}:1>", "lora.png")
    check(with_lora != before, "the LoRA did not change the image")
    if not args.once:
        second = run(name + "_again")  # right after a generation that baked the LoRA in
        same = tensors(first["lora_path"]) == tensors(second["lora_path"])
        print("the LoRA trained after a <lora:…> generation has the first one's tensors, byte for byte:", same,
              "(expected True when the server runs on one thread)")
    after = gen("a photo of a cat", "nolora_after.png")
    print("no-LoRA image byte-identical before and after:", after == before)
    check(after == before, "the no-LoRA image changed")


if __name__ == "__main__":
    main()
