# Every target bootstraps .venv itself, so a fresh clone needs nothing but python3.
PYTHON ?= python3
# bash with pipefail: a failing pip stops make even when its output goes through a filter
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# pip, never uv/poetry: torch 2.14.1 and torchvision 0.29.1 are served from local disk.
CONSTRAINTS := constraints.txt
EXTRAS ?= dev
STAMP := $(VENV)/.stamp-$(EXTRAS)
# The checkout on sys.path as a plain path entry (beside pip's editable finder): the real package then wins over
# a folder named "deqlab" in the working directory (a clone run from the folder above it), which otherwise
# shadows it as an empty namespace package ("cannot import name ... (unknown location)").
CHECKOUT_PTH = $(PY) -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], 'deqlab-checkout.pth').write_text(str(pathlib.Path.cwd()) + '\n')"

.PHONY: demo test bench docs clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	@echo "== setting up $(VENV) with deqlab[$(EXTRAS)] (first run, or after setup.cfg changed: a few minutes) =="
	$(PIP) install -q --upgrade pip
	$(PIP) install -c $(CONSTRAINTS) -e ".[$(EXTRAS)]" | awk '/^(Collecting|Successfully)/ {print; fflush()}'
	$(CHECKOUT_PTH)
	touch $@

# The demo needs deqlab and what it installs, nothing from the dev or docs extras.
CORE_STAMP := $(VENV)/.stamp-core
$(CORE_STAMP): setup.cfg pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	@if [ -e $(VENV)/.stamp-dev ] && [ $(VENV)/.stamp-dev -nt setup.cfg ]; then touch $@; exit 0; fi; \
	echo "== setting up $(VENV) for the demo (first run only: torch, Lightning and their dependencies, a few minutes) =="; \
	$(PIP) install -q --upgrade pip && \
	$(PIP) install -c $(CONSTRAINTS) -e . | awk '/^(Collecting|Successfully)/ {print; fflush()}' && \
	$(CHECKOUT_PTH) && $(PY) -c "import deqlab, pytorch_lightning" && touch $@

demo: $(CORE_STAMP)
	$(PY) -m deqlab.demo

test: $(STAMP)
	$(PY) -m pytest -q

bench:
	$(MAKE) EXTRAS=dev,bench $(VENV)/.stamp-dev,bench
	$(PY) benchmarks/solvers.py
	$(PY) benchmarks/backward.py
	$(PY) benchmarks/backward_modes_mnist.py
	$(PY) benchmarks/train_step.py --quick --repeats 5 --write --prediction
	$(PY) benchmarks/per_sample_exit.py
	$(PY) benchmarks/revision_ab.py

docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site
	@echo "site built in site/ (open site/index.html, or: $(PY) -m mkdocs serve)"

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs
