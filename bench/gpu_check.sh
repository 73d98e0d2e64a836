#!/usr/bin/env bash
# Prove the GPU path on a GPU machine without network access, in under 8 minutes (bench/README.md).
#   bash bench/gpu_check.sh [--out DIR] [--wheels DIR] [--cpu-dry-run]
#   --out DIR      results folder (default bench/results/gpu): gpu_check.json, gpu_check.md, logs/
#   --wheels DIR   wheels to make importable first (default: .whl/ when it holds any), e.g. bitsandbytes
#   --cpu-dry-run  every stage on tiny shapes on the CPU (what CI runs)
# loraplex need not be installed: a temporary folder holding a `loraplex` package whose server/adapters/clients
# are links to this checkout goes first on PYTHONPATH (the mapping pyproject.toml's package-dir declares).
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELS=""
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        --wheels=*) WHEELS="${1#--wheels=}"; shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
if [ -z "$WHEELS" ] && compgen -G ".whl/*.whl" >/dev/null; then
    WHEELS=".whl"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

mkdir -p "$WORK/path/loraplex"
: > "$WORK/path/loraplex/__init__.py"
for part in server adapters clients; do
    ln -s "$ROOT/$part" "$WORK/path/loraplex/$part"
done
PYPATH="$WORK/path"

if [ -n "$WHEELS" ]; then
    mkdir -p "$WORK/wheels"
    for wheel in "$WHEELS"/*.whl; do
        echo "gpu_check: installing $wheel into a temporary target (no index, no deps)"
        "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$WORK/wheels" "$wheel" \
            || "$PY" -m zipfile -e "$wheel" "$WORK/wheels"  # a wheel is a zip: enough for import where pip is absent
    done
    PYPATH="$PYPATH:$WORK/wheels"
fi

export PYTHONPATH="$PYPATH${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Adapters and configs built for this run only (kept when the caller points LORAPLEX_BENCH_CACHE elsewhere).
export LORAPLEX_BENCH_CACHE="${LORAPLEX_BENCH_CACHE:-$WORK/cache}"
"$PY" -c "import loraplex.server, loraplex.adapters; print('gpu_check: loraplex from', loraplex.__path__[0])"
"$PY" bench/gpu_check.py ${ARGS[@]+"${ARGS[@]}"}
