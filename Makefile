# Two entry points: `make demo` (main job on built-in synthetic data) and `make test`.
# torch is installed first and pinned, so CPU machines get the CPU build from the local wheel or
# PyPI's index and GPU machines get PyPI's default CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench-metrics clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/semidiff demo

test: $(STAMP)
	$(PY) -m pytest -q -ra

clean:
	rm -rf demo_output runs .pytest_cache
