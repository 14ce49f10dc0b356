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

.PHONY: setup demo test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q -c constraints.txt -e '.[ui,dev]'
	$(PIP) install -q --no-deps -c constraints.txt $(NODEPS)
	touch $@

demo: setup
	$(PY) -m lib_lora demo

lint: setup
	$(PY) -m ruff check .

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest
