#!/usr/bin/env bash
# Install nginx and its njs module (Debian's `nginx` + `libnginx-mod-http-js`) for the real-nginx routing test
# (tests/deploy/test_nginx_routing.py), if `nginx` is not on PATH or the njs module file is missing.
# Idempotent and quiet. The package's service is never started: tests run their own nginx process.
# Needs root (CI and the dev machines run as root) and the Debian package mirror.
set -euo pipefail
# Where Debian's libnginx-mod-http-js puts the module; deploy/nginx/nginx.conf loads it from this path.
JS_MODULE=/usr/lib/nginx/modules/ngx_http_js_module.so
if command -v nginx >/dev/null 2>&1 && [ -f "$JS_MODULE" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_nginx.sh: nginx or its njs module ($JS_MODULE) is missing and installing them needs root" >&2
    exit 1
fi
# policy-rc.d exit 101 = "do not start services" for invoke-rc.d and deb-systemd-invoke (the postinst
# would otherwise start Debian's nginx on :80). Only remove the file if we created it.
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
# `nginx` is the plain server (bookworm's nginx-light only adds the echo module on top of it); the upstream
# hash module we need is built in. Quiet on success; on failure show apt's output.
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx libnginx-mod-http-js; } \
        >"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "install_nginx.sh: apt-get failed" >&2
    exit 1
fi
command -v nginx >/dev/null 2>&1 || { echo "install_nginx.sh: nginx still not on PATH" >&2; exit 1; }
[ -f "$JS_MODULE" ] || { echo "install_nginx.sh: $JS_MODULE still missing after install" >&2; exit 1; }
