# Two commands on a fresh machine: `make repro` (the whole DAG on the embedded
# sample: dvc.yaml and the study's search/dvc.yaml) and `make test`. Both create .venv and install requirements.lock
# (exact pins) when it is missing or the lock changed.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
LOCK_HASH := $(shell sha1sum requirements.lock | cut -c1-12)
STAMP := $(VENV)/.installed-$(LOCK_HASH)

.PHONY: install repro search test test-fast bench bench-skill ui dashboard exp-show dag lint clean predict

install: $(STAMP)

$(STAMP): requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 2; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	@rm -f $(VENV)/.installed-* && touch $@

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro --all-pipelines

# the Optuna study alone (its own pipeline, so `dvc exp run` of a model never runs it)
search: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro search/dvc.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_chunk.py
	$(BIN)/python benchmarks/bench_fetch.py
	$(BIN)/python benchmarks/bench_models.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_memory_options.py
	$(BIN)/python benchmarks/bench_search.py

# test skill against CPU training time per model family (minutes to an hour: not part of `make bench`);
# e.g. make bench-skill ARGS="--quick --models convlstm"; writes /tmp/bench_skill (--out)
bench-skill: $(STAMP)
	$(BIN)/python benchmarks/bench_skill.py $(ARGS)

# MLflow UI on the project's store; prints the runs-table link (PORT=5000 by default)
PORT ?= 5000
ui: $(STAMP)
	$(BIN)/python -m pipeline.ui --port $(PORT)

# optuna-dashboard on the search stage's study (journal file or search.storage)
DASHBOARD_PORT ?= 8080
dashboard: $(STAMP)
	$(BIN)/python -m pipeline.dashboard --port $(DASHBOARD_PORT)

# dvc exp show in 120 columns (or the terminal's): each experiment's changed params, then the model's CSI-M,
# its ratio to persistence and the baselines' CSI-M (pipeline/exp_show.py); ARGS="--all-params", "--width 160"
exp-show: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pipeline.exp_show $(ARGS)

# a forecast from the first test window with the phase-2 checkpoint: reports/predict/forecast.{npz,png,gif}
predict: $(STAMP)
	$(BIN)/python -m pipeline.predict --windows data/windows/test.h5 --window 0 --out reports/predict/forecast.npz $(ARGS)

dag: $(STAMP)
	$(BIN)/dvc dag

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the run products that are not committed (data, checkpoints, the MLflow store); the committed
# reports/ stay (git restores any other change: git checkout reports)
clean:
	rm -rf data/raw data/windows data/.*.lock artifacts mlruns mlflow.db mlflow.db-* mlflow.db.lock reports/predict
