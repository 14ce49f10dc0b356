#!/usr/bin/env bash
# Run HERE (a machine with the package registry), in the repository root: puts into .gpu/ the
# packages the GPU machine lacks, for its Python 3.12 (it has torch, numpy, safetensors,
# accelerate, onnxruntime, tensorboard, opencv, Pillow...; transformers there is 5.x, so 4.46.1
# travels: Forge's pin). bitsandbytes travels unpacked with only its CUDA 13 library, to stay
# under the device tool's 64 MiB. .gpu/ is git-ignored; `run` with carry [".gpu"]: see bench/gpu/run.sh.
set -euo pipefail
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
out=.gpu
rm -rf "$out" && mkdir -p "$out/wheels" "$out/site"
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do plat+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${plat[@]}" -d "$out/wheels" \
    diffusers==0.31.0 transformers==4.46.1 tokenizers==0.20.3 huggingface-hub==0.25.2 \
    prodigyopt==1.1.2 open-clip-torch==2.20.0 stable-diffusion-sdkit==2.1.5
"$PY" -m pip wheel -q --no-deps -w "$out/wheels" dadaptation==3.2 deepdanbooru-onnx==0.0.8  # sdists: pure Python
tmp=$(mktemp -d)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${plat[@]}" -d "$tmp" bitsandbytes==0.49.2
"$PY" - "$tmp" "$out/site" <<'PYEOF'
import pathlib, sys, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(src.glob("bitsandbytes-*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        lib = name.rsplit("/", 1)[-1]
        if lib.startswith("libbitsandbytes_") and lib not in ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"):
            continue  # other CUDA/ROCm builds: the GPU machine's torch is cu130
        z.extract(name, dst)
PYEOF
rm -rf "$tmp"
du -sh "$out"
