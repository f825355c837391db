# make demo   train the tutorial's CNN on CIFAR-10, evaluate it, write the confusion matrix
# make test   lint and run the test suite
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The shared JPEG copy of CIFAR-10 when this machine has it; otherwise cnnlab's own search and download.
SHARED_DATA := ../shared/data/cifar10-jpeg
DATA ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: demo test lint clean chromium

$(BIN)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.dev: $(BIN)/.base
	$(BIN)/pip install -q -e '.[dev,deploy,heif,tracking,check,openvino]'
	touch $@

demo: $(BIN)/.base
	$(BIN)/cnnlab train --preset seed $(if $(DATA),--data $(DATA),)

test: $(BIN)/.dev chromium
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports  # the layers of pyproject.toml's [tool.importlinter]
	$(BIN)/pytest -q --durations=15

# The report test opens report.html in Debian's chromium; where it cannot be installed, that test skips.
chromium:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
		&& (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) ; } \
		|| echo "chromium is not installed: the browser test will be skipped"

lint: $(BIN)/.dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# TensorFlow for benchmarks/vs_keras.py, kept out of the project's own environment.
.venv-keras/bin/.tf:
	$(PYTHON) -m venv .venv-keras
	.venv-keras/bin/pip install -q tensorflow==2.21.0 pillow
	touch $@

# torchvision beside cnnlab's networks, for benchmarks/torchvision_parity.py only (5.5 GB: a CUDA build of torch).
.venv-parity/bin/.tv:
	$(PYTHON) -m venv .venv-parity
	.venv-parity/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	touch $@

.PHONY: parity
parity: .venv-parity/bin/.tv
	.venv-parity/bin/python benchmarks/torchvision_parity.py

.PHONY: bench-keras bench
bench-keras: .venv-keras/bin/.tf

bench: $(BIN)/.dev bench-keras
	$(BIN)/python benchmarks/data_load.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/ddp_scaling.py
	$(BIN)/python benchmarks/models.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/vs_keras.py
	$(BIN)/python benchmarks/seed_step.py
	$(BIN)/python benchmarks/precision.py
	$(BIN)/python benchmarks/time_to_accuracy.py --keras
