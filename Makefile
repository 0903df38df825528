# `make quickstart` and `make test` are the two commands in the README; both set up first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check
STAMP   := $(VENV)/.installed
# Where torch comes from: pip's configured index by default; e.g. TORCH_INDEX='--index-url
# https://download.pytorch.org/whl/cpu' for the CPU build where plain PyPI would pull the CUDA wheels.
TORCH_INDEX ?=

.PHONY: setup quickstart test test-fast clean-venv

setup: $(STAMP)

# Re-runs only when the dependency files change; every step is a no-op when already satisfied.
$(STAMP): pyproject.toml constraints.txt requirements-nodeps.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0 $(TORCH_INDEX)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	touch $@

quickstart: setup
	$(VENV)/bin/compress run configs/quickstart.yaml

# Two workers with one torch thread each (docs/stack.md: oversubscribed threads are ~1000x slower).
test: setup
	$(PY) -m pytest -n 2 -q

test-fast: setup
	$(PY) -m pytest -n 2 -q -m "not real and not slow"

clean-venv:
	rm -rf $(VENV)
