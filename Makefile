# The two commands of the README: `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: setup.py | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: setup.py | $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m experiments.demo --workdir runs/demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --dist worksteal tests

test-fast: $(VENV)/.installed-test  # the fast tier: everything but the end-to-end runs marked slow
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow" tests

clean:
	rm -rf runs
