# Two commands: `make demo` (pack a real image dataset, read it back, report images/s) and
# `make test` (lint + the test suite). Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.torchrecord-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml plugins_example/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[demo,test]' -e ./plugins_example
	touch $(STAMP)

$(VENV)/.torchrecord-bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $@

# every peer side by side, warm then cold page cache (about 15 minutes on 2 cores)
bench: $(VENV)/.torchrecord-bench
	$(PY) -m benchmarks.compare
	$(PY) -m benchmarks.compare --cold

demo: $(STAMP)
	$(PY) -m benchmarks.demo

test: $(STAMP)
	$(PY) -m ruff check torchrecord tests plugins_example benchmarks
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) data build *.egg-info plugins_example/*.egg-info
