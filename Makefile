# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Each creates the virtual environment (.venv) when it is missing or out of date.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Packages installed without their dependencies: their own requirements pull torchvision
# (open-clip-torch: only its BPE vocabulary file is used), old pins (stable-diffusion-sdkit:
# only its `ldm` package, the WebUI's model classes, is used in tests) or `onnx`
# (deepdanbooru-onnx, whose onnx requirement is unused and does not build under protobuf 3.20).
NODEPS := deepdanbooru-onnx==0.0.8 open-clip-torch==2.20.0 stable-diffusion-sdkit==2.1.5

# A second, small environment with Forge's pins: its own gradio 4.x and transformers 4.46.1 (and
# the web packages gradio 4 needs: pydantic 2, fastapi...), and the main env's site-packages
# (torch & co) through a .pth file, which Python reads after the venv's own site-packages.
# The UI handlers, the training core and the WebUI host tests run there too; the data-parallel
# launches (tests/training/test_distributed.py) only in the main env: the WebUI host is single-process.
G4VENV ?= .venv-gradio4
G4PY := $(G4VENV)/bin/python
# Debian's Chromium for the browser tests (Playwright drives it; no browser download).
CHROMIUM ?= /usr/bin/chromium

.PHONY: setup demo test lint gradio4 chromium
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q -c constraints.txt -e '.[ui,dev]'
	$(PIP) install -q --no-deps -c constraints.txt $(NODEPS)
	touch $@

gradio4: $(G4VENV)/.installed

$(G4VENV)/.installed: $(VENV)/.installed constraints-gradio4.txt
	test -x $(G4PY) || $(PYTHON) -m venv $(G4VENV)
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$$($(G4PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_main_env.pth"
	$(G4PY) -m pip install -q -c constraints-gradio4.txt gradio transformers tokenizers
	touch $@

chromium:
	@test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk; } \
		|| echo "warning: could not install Chromium; the browser tests will be skipped"

demo: setup
	$(PY) -m lib_lora demo

lint: setup
	$(PY) -m ruff check .

test: setup gradio4 chromium
	$(PY) -m ruff check .
	$(PY) -m pytest
	$(G4PY) -m pytest tests/ui tests/training tests/webui tests/speed tests/reliability/test_rel_security.py -m "not browser" -q -p no:cacheprovider \
		--ignore=tests/training/test_distributed.py
