# RL-Co: the commands of the README.
#   make quickstart              set-up, then a small end-to-end run
#   make reproduce SCALE=cpu|gpu set-up, then the whole study (Tables I-II, Figs. 4-7)
#   make test                    set-up, then the whole pytest suite
# Set-up is idempotent and quiet when already done.

PYTHON ?= python3
SCALE  ?= cpu
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup quickstart reproduce test test-fast clean-runs

setup: $(STAMP) .vulkan-ok

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true

# Python packages (torch pinned to the CPU build; see README for CUDA).
$(STAMP): requirements.txt | $(VENV)/bin/python
	@echo "Installing Python packages into $(VENV) ..."
	@$(PY) -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import torch, transformers, mani_skill, pyarrow, av, tyro" \
		|| { echo "Python package installation failed" >&2; exit 1; }
	@touch $(STAMP)

# System packages: a Vulkan device for SAPIEN (Mesa lavapipe >= 24.3 on a CPU-only machine).
.vulkan-ok: scripts/install_vulkan.sh | $(STAMP)
	@bash scripts/install_vulkan.sh $(PY)
	@touch .vulkan-ok

quickstart: setup
	$(PY) quickstart.py

reproduce: setup
	$(PY) reproduce.py --scale $(SCALE)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not e2e" tests

clean-runs:  # training runs and the quickstart's table (the committed study results stay)
	rm -rf runs results/quickstart
