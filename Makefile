# node-agent developer commands. Everything runs from a virtualenv in .venv that `install`
# creates; `test` also installs the Debian packages the integration tests drive (as root).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PYTEST_ARGS ?=
# The venv is built from the locked versions (pip constraints), so every run of `make test`
# and CI tests the same set; `make test-latest` empties this to try the newest releases
# pyproject.toml allows.
CONSTRAINTS ?= -c requirements.lock -c requirements-test.lock

.PHONY: install system-deps demo test test-latest unit integration lint bench clean

install: $(VENV)/.installed

# The agent and what it needs to run (make demo); the test tools come on top (make install).
$(VENV)/.runtime: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --upgrade $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime requirements-test.lock
	$(PY) -m pip install --quiet --upgrade $(CONSTRAINTS) -e '.[test]'
	touch $@

# containerd, docker-registry, htpasswd and dbus-daemon for the integration tests.
system-deps:
	@if [ "$$(id -u)" = 0 ]; then bash .ci/install-system-deps.sh; \
	else echo "not root: skipping Debian packages (integration tests will be skipped)"; fi

demo: $(VENV)/.runtime
	$(BIN)/node-agent demo --dir demo-node

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile

unit: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

integration: install system-deps
	$(PY) -m pytest integration $(PYTEST_ARGS)

test: install system-deps lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The whole suite on the newest releases pyproject.toml allows, in a venv of its own, resolved
# anew on every run: a breaking release fails this target, not main. Not part of CI.
test-latest:
	rm -f .venv-latest/.installed .venv-latest/.runtime
	$(MAKE) install VENV=.venv-latest CONSTRAINTS=
	@echo "test-latest: versions that differ from the locks:"
	@.venv-latest/bin/python -m pip freeze --exclude node-agent \
	  | grep -v -i -x -F -f <(sed -n '/^[^#]/p' requirements.lock requirements-test.lock) || true
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

bench: install
	$(PY) bench/reconcile_bench.py

clean:
	rm -rf $(VENV) .venv-latest demo-node build *.egg-info

# ---- container image and cluster manifests ------------------------------------------------
# make image                     build the image (needs docker or podman: CONTAINER_ENGINE=podman)
# make manifests                 render daemonset/ (+ rbac/) to one YAML, $(MANIFESTS)
# make manifests MONITORING=1    ... with the PodMonitor and alert rules (Prometheus Operator)
# make deploy                    kubectl apply that file and wait for the rollout
# make lock                      re-pin requirements.lock after a dependency change
# Set IMAGE_NAME (e.g. registry.example.com/node-agent) and IMAGE_TAG for your registry.

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_NAME ?= node-agent
IMAGE_TAG ?= $(VERSION)
CONTAINER_ENGINE ?= docker
KUBECTL ?= kubectl
MONITORING ?= 0
MANIFESTS ?= build/node-agent.yaml
MANIFESTS_OVERLAY := build/manifests

.PHONY: image manifests deploy lock

image:
	$(CONTAINER_ENGINE) build --tag $(IMAGE_NAME):$(IMAGE_TAG) .

# A throw-away kustomize overlay over daemonset/ that sets the image (and adds the monitoring
# component), rendered with kubectl's built-in kustomize. Kustomize takes relative paths only.
manifests:
	@mkdir -p $(MANIFESTS_OVERLAY) $(dir $(MANIFESTS))
	@base=$$(realpath --relative-to=$(MANIFESTS_OVERLAY) daemonset); \
	 { echo 'apiVersion: kustomize.config.k8s.io/v1beta1'; \
	   echo 'kind: Kustomization'; \
	   echo "resources: [$$base]"; \
	   if [ "$(MONITORING)" = 1 ]; then echo "components: [$$base/monitoring]"; fi; \
	   echo 'images: [{name: node-agent, newName: "$(IMAGE_NAME)", newTag: "$(IMAGE_TAG)"}]'; \
	 } > $(MANIFESTS_OVERLAY)/kustomization.yaml
	$(KUBECTL) kustomize $(MANIFESTS_OVERLAY) > $(MANIFESTS).tmp && mv $(MANIFESTS).tmp $(MANIFESTS)
	@echo "wrote $(MANIFESTS) (image $(IMAGE_NAME):$(IMAGE_TAG))"

deploy: manifests
	$(KUBECTL) apply -f $(MANIFESTS)
	$(KUBECTL) --namespace node-agent rollout status daemonset/node-agent --timeout=10m

# Exact versions: the runtime dependencies (install the project into a fresh venv, freeze),
# then the test tools on top of those (freeze again, keep what is new).
lock:
	rm -rf build/lock-venv
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/python -m pip install --quiet --upgrade pip
	build/lock-venv/bin/python -m pip install --quiet .
	{ sed -n '/^#/p' requirements.lock; \
	  build/lock-venv/bin/python -m pip freeze --exclude node-agent; } > requirements.lock.new
	build/lock-venv/bin/python -m pip install --quiet -c requirements.lock.new '.[test]'
	{ sed -n '/^#/p' requirements-test.lock; \
	  build/lock-venv/bin/python -m pip freeze --exclude node-agent \
	    | grep -v -i -x -F -f <(sed -n '/^[^#]/p' requirements.lock.new); } > requirements-test.lock.new
	mv requirements.lock.new requirements.lock
	mv requirements-test.lock.new requirements-test.lock
	rm -rf build/lock-venv

# The reliability campaigns of RELIABILITY.md at full size (crash, I/O faults, bad input,
# containerd failure, leak audit, and the daemon's: API faults, concurrent writers, I/O
# faults, one restart attempt per interval; tests/test_campaign_daemon_*.py). `make test`
# runs the same campaigns with reduced counts.
.PHONY: reliability
reliability: install system-deps
	NODE_AGENT_CAMPAIGN_SCALE=full $(PY) -m pytest tests/test_campaign_*.py \
		tests/test_leak_audit.py \
		integration/test_campaign_*.py $(PYTEST_ARGS)
