# Two commands on a fresh machine (README): `make experiment` and `make test`.
# Each one creates .venv with the pinned versions first (once; re-done when a lock file changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup experiment smoke test test-slow lint schema clean-venv ship-base

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock requirements-nodeps.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>$(VENV)/pip.log
	$(BIN)/python -m pip install --quiet -r requirements.lock 2>>$(VENV)/pip.log
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.lock 2>>$(VENV)/pip.log
	$(BIN)/python -m pip install --quiet --no-deps -e . 2>>$(VENV)/pip.log
	touch $@

## The main job: the default shapes experiment, ending with results/shapes/report.md
experiment: setup
	$(BIN)/snakemake --cores $(CORES)

## The whole DAG on the smoke config (minutes)
smoke: setup
	$(BIN)/snakemake --cores $(CORES) --configfile config/smoke.yaml

## The default test suite (< 15 min on 2 cores)
test: setup
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

## Slow tests (multi-process, whole-DAG runs); CI runs them when time allows
test-slow: setup
	$(BIN)/python -m pytest -m "slow and not gpu" -q

lint: setup
	$(BIN)/snakemake --lint

schema: setup
	$(BIN)/python -m lpo.config --write-schema

clean-venv:
	rm -rf $(VENV)

## Re-ship the shapes base model from a pretrain_base run (see lpo/assets/shapes_base/README.md)
RUN ?= results/shapes/pretrain
ship-base:
	rm -rf lpo/assets/shapes_base.new && mkdir -p lpo/assets/shapes_base.new
	cp -r $(RUN)/weights/unet $(RUN)/weights/vae $(RUN)/metrics.json lpo/assets/shapes_base.new/
	cp lpo/assets/shapes_base/README.md lpo/assets/shapes_base.new/ 2>/dev/null || true
	rm -rf lpo/assets/shapes_base && mv lpo/assets/shapes_base.new lpo/assets/shapes_base
