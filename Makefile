# vggserve: every target is idempotent; the venv is created once and reused.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_REPOSITORY ?= model_repository
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: venv test lint serve models imagenet-models clean-models

venv: $(STAMP)

# torch/torchvision are pinned in pyproject.toml; pip takes them from the machine's disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,triton]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q --timeout=900

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# torchvision's ImageNet VGG-16 and VGG-19 (cache or download).
imagenet-models: venv
	$(PY) export/to_onnx.py --repository $(MODEL_REPOSITORY)

clean-models:
	rm -rf $(MODEL_REPOSITORY)/*/
