# Two commands for a fresh machine: `make run` (the service + a local worker + a demo
# study) and `make test` (everything CI runs). Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8000
WORKERS ?= 1

.PHONY: run test lint bench clean setup

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch 2.14.1 / torchvision 0.29.1 are the releases these machines carry on disk
	$(BIN)/python -m pip install -q 'torch==2.14.1' 'torchvision==0.29.1' || $(BIN)/python -m pip install -q torch torchvision
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/dendro serve --demo --workers $(WORKERS) --port $(PORT)

test: $(STAMP)
	$(BIN)/ruff check core studies service tests bench
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check core studies service tests bench

bench: $(STAMP)
	$(BIN)/python bench/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
