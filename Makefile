# wmhqc: one entry point for setting up, testing and reproducing the study.
#   make reproduce                 synthetic cohort, cpu profile, all folds, then the book
#   make reproduce PROFILE=smoke   a tiny end-to-end run in minutes
#   make reproduce DATA_ROOT=/data/wmh FOLDS="1 2"
#   make test                      lint + test suite
#   make bench                     MC U-net speed figures (training, MC batched vs naive)
#   make install GPU=1             CUDA TensorFlow for a GPU node
#   make slurm PARTITION=gpu ACCOUNT=proj GPUS=1 TIME=12:00:00   SLURM job array, one task
#                                  per fold (DRY_RUN=1: write scripts only; SLURM_ARGS=...)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= cpu
FOLDS ?=
DATA_ROOT ?=
RESULTS ?= results/$(PROFILE)
GPU ?=
PARTITION ?=
ACCOUNT ?=
GPUS ?=
TIME ?=
DRY_RUN ?=
SLURM_ARGS ?=
EXTRA := $(if $(GPU),gpu,cpu)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: install test lint reproduce slurm bench synth clean help

help:
	@sed -n '2,/^[^#]/{/^#/p}' Makefile

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

# One data job, then an array job with one task per fold, then the all-fold chapters and the
# book (see wmhqc_lib/slurm.py); TIME is the limit of each fold task.
slurm: install
	@test -n "$(PARTITION)" || { echo "make slurm: set PARTITION=<partition>" >&2; exit 2; }
	$(BIN)/wmhqc slurm --profile $(PROFILE) --results $(RESULTS) --partition $(PARTITION) \
		$(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(if $(FOLDS),--folds $(FOLDS)) \
		$(if $(ACCOUNT),--account $(ACCOUNT)) $(if $(GPUS),--gpus $(GPUS)) \
		$(if $(TIME),--time-fold $(TIME)) $(if $(DRY_RUN),--dry-run) $(SLURM_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_mc.py --profile $(PROFILE)

synth: install
	$(BIN)/wmhqc data synth --profile $(PROFILE) --out data/synthetic-$(PROFILE)

clean:
	rm -rf results data/synthetic-* .pytest_cache .ruff_cache
