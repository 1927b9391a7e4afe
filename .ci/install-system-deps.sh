#!/usr/bin/env bash
# Install the Debian packages the integration tests need, and only when something is missing:
#   containerd       /usr/bin/containerd (1.6 on bookworm), the runtime node-agent configures
#   docker-registry  /usr/bin/docker-registry (distribution 2.8), the htpasswd-protected registry
#   apache2-utils    htpasswd, to write the registry's bcrypt password file
#   dbus             dbus-daemon, a private bus for testing the systemd restart path
#   prometheus       promtool (2.42 on bookworm), to check and unit-test the alert rules in
#                    daemonset/monitoring/; the Prometheus server itself is not used
#   systemd          systemd-analyze, to verify the host units of daemonset/restart-trigger/
#                    (only the tool is used; nothing here runs systemd)
# Run as root. Safe to run again: with everything present it changes nothing.
#
# Three packages ship services (containerd.service; docker-registry.service plus a SysV script
# that would serve on :5000; prometheus.service plus a SysV script that would scrape and serve
# on :9090 — its postinst also adds a `prometheus` system user). The tests start their own
# processes on their own paths and ports, so the packaged services are not wanted: services are
# kept from starting during the install. `--no-install-recommends` also keeps out
# prometheus-node-exporter, which prometheus recommends and which would be one more service.
set -euo pipefail

readonly PACKAGES=(containerd docker-registry apache2-utils dbus prometheus systemd)
readonly REQUIRED_BINARIES=(/usr/bin/containerd /usr/bin/docker-registry /usr/bin/htpasswd
    /usr/bin/dbus-daemon /usr/bin/promtool /usr/bin/systemd-analyze)
readonly POLICY=/usr/sbin/policy-rc.d

missing_binaries() {
    local binary
    for binary in "${REQUIRED_BINARIES[@]}"; do
        [[ -x "$binary" ]] || echo "$binary"
    done
}

# invoke-rc.d and deb-systemd-invoke ask policy-rc.d before starting a service; exit code 101
# means "not allowed". Only add one when the machine has none, and remove it afterwards.
forbid_service_starts() {
    if [[ -e "$POLICY" ]]; then
        return
    fi
    printf '#!/bin/sh\n# Temporary, from node-agent .ci/install-system-deps.sh\nexit 101\n' >"$POLICY"
    chmod 755 "$POLICY"
    trap 'rm -f "$POLICY"' EXIT
}

main() {
    local missing
    missing=$(missing_binaries)
    if [[ -z "$missing" ]]; then
        echo "install-system-deps: all present, nothing to do"
        return
    fi
    echo "install-system-deps: missing: ${missing//$'\n'/ }"
    if [[ $EUID -ne 0 ]]; then
        echo "install-system-deps: must run as root to install ${PACKAGES[*]}" >&2
        return 1
    fi
    forbid_service_starts
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
    missing=$(missing_binaries)
    if [[ -n "$missing" ]]; then
        echo "install-system-deps: still missing after install: ${missing//$'\n'/ }" >&2
        return 1
    fi
}

main "$@"
