#!/usr/bin/env bash
# Install nginx and its njs module (Debian's packages) for the routing tests (deploy/nginx/), if missing.
# Idempotent and quiet. The package's service is never started: tests run their own nginx process.
set -euo pipefail
# Where Debian's libnginx-mod-http-js puts the module; deploy/nginx/nginx.conf loads it from this path.
JS_MODULE=/usr/lib/nginx/modules/ngx_http_js_module.so
if command -v nginx >/dev/null 2>&1 && [ -f "$JS_MODULE" ]; then
    exit 0
fi
# `nginx` is the plain server (bookworm's nginx-light only adds the echo module on top of it); the upstream
# hash module we need is built in.
bash "$(dirname "${BASH_SOURCE[0]}")/apt_install.sh" install_nginx.sh nginx libnginx-mod-http-js
command -v nginx >/dev/null 2>&1 || { echo "install_nginx.sh: nginx still not on PATH" >&2; exit 1; }
[ -f "$JS_MODULE" ] || { echo "install_nginx.sh: $JS_MODULE still missing after install" >&2; exit 1; }
