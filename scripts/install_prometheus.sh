#!/usr/bin/env bash
# Install a `prometheus` binary (Debian's package) for the real-Prometheus scrape test, if none is on PATH.
# Idempotent and quiet. The package's service is never started: tests run their own prometheus process.
# Needs root (CI and the dev machines run as root) and the Debian package mirror.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_prometheus.sh: prometheus is missing and installing it needs root" >&2
    exit 1
fi
# policy-rc.d exit 101 = "do not start services" for invoke-rc.d and deb-systemd-invoke (the postinst
# would otherwise start Debian's prometheus on :9090). Only remove the file if we created it.
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$POLICY"
    chmod 755 "$POLICY"
    CREATED_POLICY=1
fi
LOG="$(mktemp)"
cleanup() { if [ "$CREATED_POLICY" -eq 1 ]; then rm -f "$POLICY"; fi; rm -f "$LOG"; }
trap cleanup EXIT
export DEBIAN_FRONTEND=noninteractive
# Quiet on success; on failure show apt's output (it says which mirror or package went wrong).
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } >"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "install_prometheus.sh: apt-get failed" >&2
    exit 1
fi
command -v prometheus >/dev/null 2>&1 || { echo "install_prometheus.sh: prometheus still not on PATH" >&2; exit 1; }
