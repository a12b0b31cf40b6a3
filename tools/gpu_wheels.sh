#!/usr/bin/env bash
# Download into .whl/ the wheels the GPU machine lacks, for tools/gpu_check.sh to install.
#
#   bash tools/gpu_wheels.sh            # from the repository root, with network access to PyPI
#
# The GPU machine (Python 3.12, x86-64, no package registry) has torch, triton, transformers,
# safetensors, pyyaml, tqdm, numpy and pytest, but not pydantic, which obs_compress is about
# to require (>= 2.6). This fetches pydantic and the packages it needs, at the versions of
# this project's CPU environment, as cp312 manylinux x86-64 wheels (pure-Python ones are
# py3-none-any), with the pip download command of /work/.library/device/README.md.
# typing-extensions is on the GPU machine too, at a version nobody has read; pydantic-core
# needs a recent one (>= 4.16.0), so it travels as well and shadows the machine's (newer
# typing-extensions releases keep the old names).
#
# .whl/ is ignored by git (/.whl/ in .gitignore) and travels only when the device call names
# it: carry [".whl"]. One version of each package: the folder is emptied first.
# PYTHON names the interpreter whose pip downloads (default: .venv/bin/python, else python3).

set -euo pipefail

WHEELS=(
    "pydantic==2.14.4"
    "pydantic-core==2.50.5"
    "annotated-types==0.8.0"
    "typing-inspection==0.4.5"
    "typing-extensions==4.16.0"
)

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

rm -rf .whl
mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

echo "wheels in .whl/:"
for wheel in .whl/*.whl; do
    printf '  %-64s %6s KiB\n' "${wheel#.whl/}" "$(( $(stat -c %s "$wheel") / 1024 ))"
    # What each needs, for a check by eye that it is here or on the GPU machine.
    "$PYTHON" - "$wheel" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as archive:
    metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    needs = [line.split(":", 1)[1].strip() for line in
             archive.read(metadata).decode().splitlines()
             if line.startswith("Requires-Dist:") and "extra ==" not in line]
print("      needs: " + (", ".join(needs) or "nothing"))
EOF
done
echo "total: $(du -sk .whl | cut -f1) KiB (the device call carries at most 64 MiB in all)"
