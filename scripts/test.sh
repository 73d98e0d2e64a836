#!/usr/bin/env bash
# Set up .venv (with the dev extras) and run lint + the whole test suite. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LORAPLEX_EXTRAS=dev,ray bash scripts/bootstrap.sh
# Services the tests talk to for real (installed from Debian's packages when absent).
bash scripts/install_prometheus.sh
bash scripts/install_nginx.sh
bash scripts/install_kubectl.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Tiny test models gain nothing from intra-op threads, and the suite runs server subprocesses beside
# pytest: one thread per process avoids oversubscribing the cores (measured 4-20x slower otherwise).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: for us that is a failure, never a pass.
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
