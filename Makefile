# Set-up and entry points. `make demo` and `make test` are the only two commands a fresh machine needs.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
FAISS  ?= cpu
PIP    := $(VPY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP  := $(VENV)/.installed-$(FAISS)

.PHONY: install demo test bench clean-venv

install: $(STAMP)

$(STAMP): setup.py constraints.txt Makefile
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@echo "[install] torch + torchvision (the tested pair)"
	$(PIP) torch torchvision
	@echo "[install] fast-reid 1.4.0 with --no-deps: its pins (torch==1.13.1, ...) have no Python 3.11 build"
	$(PIP) --no-deps fastreid==1.4.0 2>&1 | $(VPY) tools/pip_filter.py
	@echo "[install] the project (editable) and what fast-reid really needs (setup.py)"
	$(PIP) -e ".[$(FAISS),test]" 2>&1 | $(VPY) tools/pip_filter.py
	$(VPY) -m adaptive_l2.build_rank_evaluator
	@touch $(STAMP)

demo: install
	$(VPY) tools/reproduce_table.py --suite synthetic

test: install
	$(VPY) -m pytest -q tests

bench: install
	$(VPY) benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)
