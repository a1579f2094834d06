# Set-up and entry points. `make demo` and `make test` are the only two commands a fresh machine needs.
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
	@echo "[install] torch + torchvision (tested pair), fast-reid 1.4.0 (--no-deps), project"
	$(PIP) torch torchvision
	$(PIP) --no-deps fastreid==1.4.0
	$(PIP) -e ".[$(FAISS),test]"
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
