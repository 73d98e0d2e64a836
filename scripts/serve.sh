#!/usr/bin/env bash
# Set up .venv and start the server. Without --model it serves the built-in demo model.
# Any argument is passed to `loraplex serve` (see `loraplex serve --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/loraplex serve "$@"
