# node-agent developer commands. Everything runs from a virtualenv in .venv that `install`
# creates; `test` also installs the Debian packages the integration tests drive (as root).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PYTEST_ARGS ?=

.PHONY: install system-deps demo test unit integration lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# containerd, docker-registry, htpasswd and dbus-daemon for the integration tests.
system-deps:
	@if [ "$$(id -u)" = 0 ]; then bash .ci/install-system-deps.sh; \
	else echo "not root: skipping Debian packages (integration tests will be skipped)"; fi

demo: install
	$(BIN)/node-agent demo --dir demo-node

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

integration: install system-deps
	$(PY) -m pytest integration $(PYTEST_ARGS)

test: install system-deps lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) bench/reconcile_bench.py

clean:
	rm -rf $(VENV) demo-node build *.egg-info
