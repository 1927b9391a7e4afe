# node-agent's container image: `make image` (docker build -t node-agent:<version> .).
# Runs `node-agent run`; the DaemonSet in daemonset/ passes its flags as args.
#
# Stages: `base` pins the Python image once; `build` makes the app wheel and a virtualenv
# holding exactly the pinned runtime dependencies (requirements.lock) plus that wheel; the
# final stage copies only the virtualenv: no build tools, no pip in it, no source tree.

# CPython 3.11, the version requirements.lock was resolved for (change both together).
FROM python:3.11.13-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

FROM base AS build
# The virtualenv has no pip of its own: the base image's pip installs into it (--python).
RUN python -m venv --without-pip /opt/node-agent
COPY requirements.lock /tmp/requirements.lock
# Exactly the locked set, nothing resolved at build time (--no-deps), then a consistency check.
# grpcio and the other compiled dependencies come as manylinux wheels: no compiler needed.
RUN pip --python /opt/node-agent/bin/python install --no-cache-dir --no-deps \
        --only-binary=:all: -r /tmp/requirements.lock \
    && pip --python /opt/node-agent/bin/python check
# The app as a wheel, built with a pinned build backend (pyproject.toml: setuptools >= 68).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node_agent ./node_agent
RUN pip install --no-cache-dir setuptools==84.2.1 \
    && pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels . \
    && pip --python /opt/node-agent/bin/python install --no-cache-dir --no-deps /wheels/node_agent-*.whl \
    && pip --python /opt/node-agent/bin/python check

FROM base
LABEL org.opencontainers.image.title="node-agent" \
      org.opencontainers.image.description="Per-node agent that keeps registry pull credentials in containerd's config.toml and the kubelet's config.json in step with a Secret" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/node-agent /opt/node-agent
ENV PATH=/opt/node-agent/bin:$PATH
# Root, deliberately, and the only way this agent can work: it rewrites root-owned node files
# (/etc/containerd/config.toml, /var/lib/kubelet/config.json, both 0600 once they hold
# credentials) in place of their owner, and asks systemd over the host's D-Bus to restart
# containerd, which systemd grants to uid 0 only. A non-root uid would need
# CAP_DAC_OVERRIDE and CAP_CHOWN (more privilege, not less) and still could not restart
# containerd. The DaemonSet takes everything else away: no capabilities at all, read-only
# root filesystem, no privilege escalation, seccomp RuntimeDefault (daemonset/daemonset.yaml).
# hadolint ignore=DL3002
USER 0:0
EXPOSE 9464
ENTRYPOINT ["node-agent"]
CMD ["run", "--help"]
