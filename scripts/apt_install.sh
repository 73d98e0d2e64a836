#!/usr/bin/env bash
# Install Debian packages for the tests' real services, quietly, without starting their services:
#   bash scripts/apt_install.sh CALLER PACKAGE...
# CALLER names the script in messages. Needs root (CI and the dev machines run as root) and the Debian mirror.
set -euo pipefail
CALLER="$1"
shift
if [ "$(id -u)" -ne 0 ]; then
    echo "$CALLER: $* missing, and installing needs root" >&2
    exit 1
fi
# policy-rc.d exit 101 = "do not start services" for invoke-rc.d and deb-systemd-invoke (a postinst would
# otherwise start Debian's prometheus on :9090 or nginx on :80). Only remove the file if we created it.
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
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"; } >"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "$CALLER: apt-get failed" >&2
    exit 1
fi
