# make demo   train the tutorial's CNN on CIFAR-10, evaluate it, write the confusion matrix
# make test   lint and run the test suite
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The shared JPEG copy of CIFAR-10 when this machine has it; otherwise cnnlab's own search and download.
SHARED_DATA := ../shared/data/cifar10-jpeg
DATA ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: demo test lint clean

$(BIN)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.dev: $(BIN)/.base
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/.base
	$(BIN)/cnnlab train --preset seed $(if $(DATA),--data $(DATA),)

test: $(BIN)/.dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q

lint: $(BIN)/.dev
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
