# vggserve: every target is idempotent; the venv is created once and reused.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_REPOSITORY ?= model_repository
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: venv browser test lint serve models imagenet-models clean-models

venv: $(STAMP)

# torch/torchvision are pinned in pyproject.toml; pip takes them from the machine's disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,triton,ray]'
	touch $(STAMP)

# Chromium for tests/test_browser.py (Debian's packages). make test installs them when missing
# and it runs as root (or give APT_GET="sudo apt-get"); otherwise it says what to install and the
# browser tests skip, saying why.
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
APT_GET ?= $(if $(filter 0,$(shell id -u)),apt-get)
INSTALL_BROWSER := apt-get update && apt-get install -y chromium chromium-driver

browser:
	@if [ -x "$(CHROMIUM)" ] && [ -x "$(CHROMEDRIVER)" ]; then :; \
	elif [ -n "$(APT_GET)" ]; then \
		echo "installing Chromium for the browser tests: $(INSTALL_BROWSER)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		$(APT_GET) update -qq && $(APT_GET) install -y -qq chromium chromium-driver \
		|| echo "could not install chromium and chromium-driver: the browser tests will be skipped"; \
	else echo "Chromium ($(CHROMIUM), $(CHROMEDRIVER)) is missing: the browser tests will be skipped; to run them, install it as root: $(INSTALL_BROWSER)"; fi

test: venv browser
	VGGSERVE_CHROMIUM=$(CHROMIUM) VGGSERVE_CHROMEDRIVER=$(CHROMEDRIVER) $(PY) -m pytest -q --timeout=900

lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# torchvision's ImageNet VGG-16 and VGG-19 (cache or download).
imagenet-models: venv
	$(PY) -m export.to_onnx --repository $(MODEL_REPOSITORY)

# The command, not $(MAKE) demo-models: make -n would run a recipe line that names $(MAKE).
DEMO_MODELS = $(PY) -m train.demo --data data/synthetic --runs runs --repository $(MODEL_REPOSITORY)

# Models for the main job: what the repository already holds; else torchvision's ImageNet VGG-16
# and VGG-19 (cache or download); else, offline, the demo models trained here (make demo-models).
models: venv
	@if ls $(MODEL_REPOSITORY)/*/config.pbtxt >/dev/null 2>&1; then \
		echo "models in $(MODEL_REPOSITORY): $$(ls $(MODEL_REPOSITORY))"; \
	elif $(PY) -m export.to_onnx --repository $(MODEL_REPOSITORY); then :; \
	else echo "no ImageNet weights here: training the demo models instead (make demo-models)"; \
		$(DEMO_MODELS); fi

# The main job: the HTTP front end on the embedded ONNX Runtime backend. Each model is served at
# the scales its config.pbtxt names (the demo models at Q = 64,96,128; ImageNet's at 256,384,512).
serve: models
	$(PY) -m server --repository $(MODEL_REPOSITORY) --host $(HOST) --port $(PORT) $(SERVE_FLAGS)

clean-models:
	rm -rf $(MODEL_REPOSITORY)/*/

# The real tritonserver bundled in nvidia-pytriton, on CPU, in the foreground (Ctrl-C stops it):
# it serves the Python-backend twin of $(MODEL_REPOSITORY), whose model.py runs the same
# model.onnx with ONNX Runtime. NVIDIA's GPU container: docker build --target triton (Dockerfile).
TRITON_HTTP_PORT ?= 8000
TRITON_GRPC_PORT ?= 8001
TRITON_METRICS_PORT ?= 8002

.PHONY: triton
triton: venv
	$(PY) -m tritonlocal --repository $(MODEL_REPOSITORY) --http-port $(TRITON_HTTP_PORT) \
		--grpc-port $(TRITON_GRPC_PORT) --metrics-port $(TRITON_METRICS_PORT)

# Locust against the HTTP front end (loadtest/run.sh --help): a server on a free port of
# 20000-29999 (two small VGGs unless LOADTEST_ARGS names --repository), Locust headless, CSV
# statistics and p50/p95/p99 in loadtest/results/. soak: 10 minutes, RSS and open files must
# stay flat after warm-up (figures in docs/reliability.md).
LOADTEST_ARGS ?=

.PHONY: loadtest soak
loadtest: venv
	loadtest/run.sh $(LOADTEST_ARGS)

soak: venv
	loadtest/run.sh --soak $(LOADTEST_ARGS)

# Demo weights without ImageNet: draw a synthetic multi-scale set, train two small VGGs (D and
# E with batch-norm, 1/8 width) on it and export them as demo-vgg16 and demo-vgg19. Every step
# is skipped when its result exists; about 8 minutes on 2 idle cores (docs/training.md).
.PHONY: demo-models
demo-models: venv
	$(DEMO_MODELS)
