# wmhqc: one entry point for setting up, testing and reproducing the study.
#   make reproduce                 synthetic cohort, cpu profile, all folds, then the book
#   make reproduce PROFILE=smoke   a tiny end-to-end run in minutes
#   make reproduce DATA_ROOT=/data/wmh FOLDS="1 2"
#   make reproduce JOBS=5          5 fold steps side by side (default 2 for smoke and cpu, 1 for
#                                  paper and your own profiles)
#   make reproduce PROFILE=mine    any section of wmhqc_lib/profiles.yml
#   make reproduce-fold-3          fold 3's steps alone (after the data stage)
#   make lab                       JupyterLab on the notebooks with the project's kernel
#   make test                      lint + test suite
#   make bench                     MC U-net speed figures (training, MC batched vs naive)
#   make check-scale PROFILE=paper every network timed at the profile's sizes on this device,
#                                  with the projected time of one fold and of the study
#   make paper-fold                check-scale, then fold 1 of the paper profile end to end
#                                  (BACKEND=jax where TensorFlow is absent); timing.txt
#   make install GPU=1             CUDA TensorFlow for a GPU node
#   make lock                      renew constraints.txt, the pinned versions make install uses
#                                  (then review the diff, rerun the tests and the book, commit)
#   make slurm PARTITION=gpu ACCOUNT=proj GPUS=1 TIME=12:00:00   SLURM job array, one task
#                                  per fold (DRY_RUN=1: write scripts only; SLURM_ARGS=...)
#   make slurm-triage BIDS=ds OUT=ds/derivatives/wmhqc MODEL=bundle [LAYER=site-layer]
#                                  triage on SLURM: one participant per array task, then the
#                                  group level (PARTITION, ACCOUNT, GPUS, TIME, DRY_RUN too)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= cpu
FOLDS ?=
DATA_ROOT ?=
RESULTS ?= results/$(PROFILE)
GPU ?=
# Keras backend: empty = TensorFlow when installed, else JAX (wmhqc_lib/__init__.py);
# BACKEND=jax installs without TensorFlow (bring jax with your CUDA build on a GPU node)
BACKEND ?=
PARTITION ?=
ACCOUNT ?=
GPUS ?=
TIME ?=
DRY_RUN ?=
SLURM_ARGS ?=
EXTRA := $(if $(filter jax,$(BACKEND)),jax,$(if $(GPU),gpu,cpu))
ifneq ($(BACKEND),)
export KERAS_BACKEND := $(BACKEND)
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: install lock test lint reproduce reproduce-data reproduce-final lab slurm slurm-triage \
	bench check-scale paper-fold synth clean help

help:
	@sed -n '2,/^[^#]/{/^#/p}' Makefile

install: $(STAMP)

# The versions the book's numbers were made with, for every extra (cpu, gpu, jax): a pip
# constraints file, so a pin applies only to what an extra installs. The gpu extra's
# tensorflow has its own line there (the release of tensorflow-cpu); its nvidia-* wheels follow
# TensorFlow's pins. CONSTRAINTS= installs the newest versions pyproject.toml allows.
CONSTRAINTS ?= constraints.txt

# Reinstalls only when pyproject.toml or the pins change (or the CPU/GPU choice does).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRA),dev]' $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) \
		|| { echo "make install: pip could not install the pinned versions of $(CONSTRAINTS)" \
			"(see its header for the Python they were resolved on); \`make install" \
			"CONSTRAINTS=\` installs unpinned, \`make lock\` renews the pins" >&2; exit 1; }
	@rm -f $(VENV)/.installed-*
	@touch $@

# A fresh resolution of the newest versions pyproject.toml allows (cpu and dev extras) in a
# throwaway environment, frozen into constraints.txt. Deliberate: run it, review
# `git diff constraints.txt`, rerun `make test` and the book, then commit the file.
LOCK_HEADER = \
	"\# Pinned versions of every package \`make install\` puts into .venv (pip constraints: a pin" \
	"\# applies only to a package an install actually needs). The book's numbers were made with" \
	"\# exactly these versions; \`make install\` passes this file to pip with -c." \
	"\# Resolved on Python $$py, $$plat, from the cpu and dev extras (pip itself unpinned);" \
	"\# on another Python \`make install CONSTRAINTS=\` takes the newest versions, unpinned." \
	"\# Renew deliberately: \`make lock\` (a fresh resolution in a throwaway environment), review" \
	"\# \`git diff constraints.txt\`, rerun \`make test\` and the book, commit."
LOCK_GPU = \
	"\# The gpu extra (make install GPU=1) installs tensorflow[and-cuda] instead of tensorflow-cpu:" \
	"\# the same release, so that GPU nodes run the version pinned above; its nvidia-* CUDA wheels" \
	"\# are left to TensorFlow's own pins. The jax extra (BACKEND=jax) uses the jax and jaxlib pins" \
	"\# above; on a GPU node install the jax CUDA plugin of that same release."
lock:
	@set -euo pipefail; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --quiet --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install --quiet -e '.[cpu,dev]'; \
	py=$$("$$tmp/venv/bin/python" -c "import platform; print(platform.python_version())"); \
	plat=$$("$$tmp/venv/bin/python" -c "import platform; print(platform.system(), platform.machine())"); \
	tf=$$("$$tmp/venv/bin/python" -c "from importlib.metadata import version; print(version('tensorflow-cpu'))"); \
	{ printf '%s\n' $(LOCK_HEADER); \
	  "$$tmp/venv/bin/python" -m pip freeze --all --exclude-editable | grep -viE '^(pip|wmhqc)( ?@|==)'; \
	  printf '%s\n' $(LOCK_GPU) "tensorflow==$$tf"; } > constraints.txt.new; \
	mv constraints.txt.new constraints.txt; \
	echo "constraints.txt renewed: review git diff constraints.txt, rerun make test, commit"

lint: install
	$(BIN)/ruff check wmhqc_lib tests notebooks benchmarks

# Two pytest-xdist workers: one builds the shared smoke run while the other runs the modules
# that need nothing from it; its readers come last, on both (tests/conftest.py orders them).
# TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: install lint
	$(BIN)/pytest -q --durations=15 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) \
		--dist loadgroup --no-loadscope-reorder)

# The chain as make targets: the data stage, one target per fold and step, then the all-fold
# chapters and the book, so `make -j N reproduce` runs N fold steps at once (each step also
# holds a lock, so two runs never execute the same step). A failing step does not stop the
# other folds (its recipe's error is ignored with `-`; its fold's later steps find it failed
# and are blocked); the final stage then reports it and exits non-zero.
FOLD_LIST = $(or $(FOLDS),$(shell $(BIN)/python -c "from wmhqc_lib.config import load_profile; \
	print(*range(1, load_profile('$(PROFILE)').folds.n_folds + 1))" 2>/dev/null))
REPRO = $(BIN)/wmhqc reproduce --profile $(PROFILE) --results $(RESULTS) \
	$(if $(DATA_ROOT),--data-root $(DATA_ROOT))

# JOBS fold steps side by side, each with FOLD_THREADS = cores / JOBS threads for TensorFlow
# (and OpenMP). Default 2 for smoke and cpu: on 2 cores, two one-thread folds ran two cpu folds in
# 7 min where one two-thread fold at a time took 13.5 (TensorFlow's own threading gains little
# on these small 3D convolutions, and start-up, tracing and plotting are single-threaded).
# 1 for paper (one GPU per fold) and for a profile of your own (one lane, which fits any
# machine; set JOBS for more). With `make -j N reproduce` set JOBS=N too, so that the
# threads are shared out.
ifneq ($(filter smoke cpu,$(PROFILE)),)
JOBS ?= 2
endif
JOBS ?= 1
CORES := $(shell nproc 2>/dev/null || echo 2)
FOLD_THREADS ?= $(shell echo $$(( $(CORES) / $(JOBS) > 0 ? $(CORES) / $(JOBS) : 1 )))

reproduce: install
	@$(MAKE) --no-print-directory $(if $(filter-out 1,$(JOBS)),-j$(JOBS)) reproduce-final

reproduce-data: install
	$(REPRO) --stage data

# reproduce-fold-<k>-<step> runs one step of fold k after the same fold's previous step.
# reproduce-final lists them step by step across the folds, so make starts every fold's first
# step before any fold's second: the last folds' last steps then run side by side, where one
# target per fold left the fifth fold running alone on one core for its whole chain.
# reproduce-fold-<k> is fold k's whole chain.
FOLD_STEPS = $(shell $(BIN)/python -c "from wmhqc_lib.study.pipeline import STEPS; \
	print(*(s.name for s in STEPS if s.per_fold))" 2>/dev/null)
FOLD_ENV = TF_NUM_INTRAOP_THREADS=$(FOLD_THREADS) TF_NUM_INTEROP_THREADS=$(FOLD_THREADS) \
	OMP_NUM_THREADS=$(FOLD_THREADS)

# Under reproduce-final a failing step's error is ignored (`-`), so that the other folds go on
# and the final stage reports it; asked for directly (reproduce-fold-<k>), the failure stops make.
KEEP_GOING = $(if $(filter reproduce-final,$(MAKECMDGOALS)),-)
define fold_step_rule
reproduce-fold-$(1)-$(2): $(if $(3),reproduce-fold-$(1)-$(3),reproduce-data)
	$$(KEEP_GOING)$$(FOLD_ENV) $$(REPRO) --stage folds --folds $(1) --step $(2)
endef

ifneq ($(filter reproduce-final reproduce-fold-%,$(MAKECMDGOALS)),)
_STEPS := $(FOLD_STEPS)
_FOLDS := $(FOLD_LIST)
ifeq ($(strip $(_STEPS)),)
$(error cannot list the fold steps with $(BIN)/python: run `make install` first)
endif
# each step with the one before it: 02_mc_unet/- 03_uncertainty/02_mc_unet ...
_PAIRS := $(wordlist 1,$(words $(_STEPS)),$(join $(addsuffix /,$(_STEPS)),- $(_STEPS)))
$(foreach f,$(_FOLDS),$(foreach p,$(_PAIRS),$(eval $(call fold_step_rule,$(f),$(word 1,\
	$(subst /, ,$(p))),$(filter-out -,$(word 2,$(subst /, ,$(p))))))))
$(foreach f,$(_FOLDS),$(eval reproduce-fold-$(f): reproduce-fold-$(f)-$(lastword $(_STEPS))))
endif

reproduce-final: reproduce-data $(foreach s,$(_STEPS),$(foreach f,$(_FOLDS),reproduce-fold-$(f)-$(s)))
	$(REPRO) --stage final --folds $(_FOLDS)

# JupyterLab on the notebooks with the project's kernel, to rerun a fold or move the live
# threshold sliders of 06_evaluation on the results of the last run.
lab: install
	$(BIN)/python -m ipykernel install --sys-prefix --name wmhqc --display-name "wmhqc (.venv)"
	$(BIN)/jupyter lab --notebook-dir=. notebooks/

# One data job, then an array job with one task per fold, then the all-fold chapters and the
# book (see wmhqc_lib/slurm.py); TIME is the limit of each fold task.
slurm: install
	@test -n "$(PARTITION)" || { echo "make slurm: set PARTITION=<partition>" >&2; exit 2; }
	$(BIN)/wmhqc slurm --profile $(PROFILE) --results $(RESULTS) --partition $(PARTITION) \
		$(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(if $(FOLDS),--folds $(FOLDS)) \
		$(if $(ACCOUNT),--account $(ACCOUNT)) $(if $(GPUS),--gpus $(GPUS)) \
		$(if $(TIME),--time-fold $(TIME)) $(if $(DRY_RUN),--dry-run) $(SLURM_ARGS)

# Triage of a BIDS dataset on the cluster: an array with one participant per task, then the
# group level (see wmhqc_lib/deploy/cluster.py); TIME is the limit of each participant task.
slurm-triage: install
	@test -n "$(BIDS)" -a -n "$(OUT)" -a -n "$(MODEL)" || { echo "make slurm-triage: set" \
		"BIDS=<dataset> OUT=<derivatives> MODEL=<bundle> (LAYER=<site layer>)" >&2; exit 2; }
	$(BIN)/wmhqc triage-slurm $(BIDS) $(OUT) --model $(MODEL) $(if $(LAYER),--layer $(LAYER)) \
		$(if $(PARTITION),--partition $(PARTITION)) $(if $(ACCOUNT),--account $(ACCOUNT)) \
		$(if $(GPUS),--gpus $(GPUS)) $(if $(TIME),--time $(TIME)) $(if $(DRY_RUN),--dry-run) \
		$(SLURM_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_mc.py --profile $(PROFILE)

# Every network built and timed at the profile's sizes; the table also goes to
# $(RESULTS)/check_scale.md (and .json). Exit status 2 when a size cannot work.
check-scale: install
	$(BIN)/wmhqc check-scale --profile $(PROFILE) --out $(RESULTS)/check_scale.md

# The first GPU fold: check-scale at the paper's sizes, then fold 1 of the paper profile from
# synthetic data to the book; results/paper/timing.txt holds the step times.
paper-fold: install
	$(BIN)/wmhqc check-scale --profile paper --out results/paper/check_scale.md
	$(MAKE) --no-print-directory reproduce PROFILE=paper FOLDS=1
	@cat results/paper/timing.txt

synth: install
	$(BIN)/wmhqc data synth --profile $(PROFILE) --out data/synthetic-$(PROFILE)

clean:
	rm -rf results data/synthetic-* .pytest_cache .ruff_cache
