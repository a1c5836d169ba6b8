# Every target bootstraps .venv itself, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# pip, never uv/poetry: torch 2.14.1 and torchvision 0.29.1 are served from local disk.
CONSTRAINTS := constraints.txt
EXTRAS ?= dev
STAMP := $(VENV)/.stamp-$(EXTRAS)

.PHONY: demo test bench docs clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $@

demo: $(STAMP)
	$(PY) -m deqlab.demo

test: $(STAMP)
	$(PY) -m pytest -q

bench:
	$(MAKE) EXTRAS=dev,bench $(VENV)/.stamp-dev,bench
	$(PY) benchmarks/solvers.py
	$(PY) benchmarks/backward.py
	$(PY) benchmarks/train_step.py --quick --repeats 5 --write --prediction
	$(PY) benchmarks/per_sample_exit.py
	$(PY) benchmarks/revision_ab.py

docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site
	@echo "site built in site/ (open site/index.html, or: $(PY) -m mkdocs serve)"

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs
