# The two set-up commands of the README: `make quickstart` and `make test`.
# Both build .venv from pyproject.toml on first use, so a fresh clone needs only Python 3.11.
# torch (the test extra, for transformers) is pinned to 2.13.0: these machines keep its CPU build
# (2.13.0+cpu, which pip prefers to PyPI's CUDA build of 2.13.0) in pip's find-links.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: install quickstart test test-all
install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/dcmodel train experiments/digits_cnn.py --workdir runs/quickstart

# The default suite (< 10 minutes on 2 cores) leaves out the cases marked slow; test-all runs every case.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 -m "not slow" tests

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 tests
