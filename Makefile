# wmhqc: one entry point for setting up, testing and reproducing the study.
#   make reproduce                 synthetic cohort, cpu profile, all folds, then the book
#   make reproduce PROFILE=smoke   a tiny end-to-end run in minutes
#   make reproduce DATA_ROOT=/data/wmh FOLDS="1 2"
#   make test                      lint + test suite
#   make bench                     MC U-net speed figures (training, MC batched vs naive)
#   make install GPU=1             CUDA TensorFlow for a GPU node
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= cpu
FOLDS ?=
DATA_ROOT ?=
RESULTS ?= results/$(PROFILE)
GPU ?=
EXTRA := $(if $(GPU),gpu,cpu)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: install test lint reproduce bench synth clean help

help:
	@sed -n '2,8p' Makefile

install: $(STAMP)

# Reinstalls only when pyproject.toml changes (or the CPU/GPU choice does).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRA),dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

lint: install
	$(BIN)/ruff check wmhqc_lib tests notebooks benchmarks

test: install lint
	$(BIN)/pytest -q

reproduce: install
	$(BIN)/wmhqc reproduce --profile $(PROFILE) --results $(RESULTS) \
		$(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(if $(FOLDS),--folds $(FOLDS))

bench: install
	$(BIN)/python benchmarks/bench_mc.py --profile $(PROFILE)

synth: install
	$(BIN)/wmhqc data synth --profile $(PROFILE) --out data/synthetic-$(PROFILE)

clean:
	rm -rf results data/synthetic-* .pytest_cache .ruff_cache
