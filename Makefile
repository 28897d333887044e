# The front door: `make demo` and `make test` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help deps venv test unit demo bench lint clean

help:
	@echo "make demo   mount sample files from a local nginx and show cp/tail/ffprobe on them"
	@echo "make test   run the whole test suite (real FUSE mounts, real nginx on 127.0.0.1)"
	@echo "make unit   run only the tests that need no mount"
	@echo "make bench  rangefs vs curl and rclone on loopback (about 5 minutes)"
	@echo "make lint   ruff and mypy"

deps:
	@scripts/install-system-deps

$(STAMP): pyproject.toml scripts/build-pyfuse3 third_party/pyfuse3-3.5.0-rangefs.patch
	@$(MAKE) --no-print-directory deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	scripts/build-pyfuse3 $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

venv: $(STAMP)

test: $(STAMP)
	@$(MAKE) --no-print-directory deps
	$(PY) -m pytest

unit: $(STAMP)
	$(PY) -m pytest -m "not mount"

demo: $(STAMP)
	@$(MAKE) --no-print-directory deps
	$(PY) scripts/demo.py

bench: $(STAMP)
	@$(MAKE) --no-print-directory deps
	$(PY) scripts/bench.py

lint: $(STAMP)
	$(VENV)/bin/pip install -q ruff mypy
	$(VENV)/bin/ruff check rangefs tests scripts
	$(VENV)/bin/mypy rangefs

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo
