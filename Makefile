# Two commands for a fresh machine: `make run` (the service + a local worker + a demo
# study) and `make test` (everything CI runs). Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8000
WORKERS ?= 1
TEST_TMP ?= /tmp/dendro-tests

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
	# The tests of the shared PostgreSQL server (the pgserver mark, tests/conftest.py) run one after
	# another in one process, some of them restart it; everything else runs on two xdist workers
	# beside them. Both must pass; the PostgreSQL process's output is printed after the rest's.
	@rm -rf $(TEST_TMP); mkdir -p $(TEST_TMP); \
	$(BIN)/python -m pytest -q -m pgserver -p no:cacheprovider --basetemp=$(TEST_TMP)/pg \
		> $(TEST_TMP)/pgserver.log 2>&1 & pg=$$!; \
	$(BIN)/python -m pytest -q -m "not pgserver" -n 2 --basetemp=$(TEST_TMP)/rest; rest=$$?; \
	wait $$pg; pgrc=$$?; \
	echo "==== the tests of the shared PostgreSQL server (-m pgserver)"; cat $(TEST_TMP)/pgserver.log; \
	echo "make test: pytest exit codes $$rest (the rest), $$pgrc (PostgreSQL)"; \
	test $$rest -eq 0 -a $$pgrc -eq 0

lint: $(STAMP)
	$(BIN)/ruff check core studies service tests bench

bench: $(STAMP)
	$(BIN)/python bench/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
