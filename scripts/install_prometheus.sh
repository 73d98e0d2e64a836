#!/usr/bin/env bash
# Install a `prometheus` binary (Debian's package) for the real-Prometheus scrape test, if none is on PATH.
# Idempotent and quiet. The package's service is never started: tests run their own prometheus process.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
bash "$(dirname "${BASH_SOURCE[0]}")/apt_install.sh" install_prometheus.sh prometheus
command -v prometheus >/dev/null 2>&1 || { echo "install_prometheus.sh: prometheus still not on PATH" >&2; exit 1; }
