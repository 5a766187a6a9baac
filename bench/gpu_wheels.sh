#!/usr/bin/env bash
# Download the sidecar's runtime dependencies as wheels for the GPU machine, which
# reaches no package index. Usage (from the repository root):
#
#   bench/gpu_wheels.sh [PYTHON_VERSION]        # default 3.12, the GPU image's python3
#
# The wheels land in bench/wheels/cpXY/ (ignored by git: bench/.gitignore), to carry
# to the device run and install there without an index:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site bench/wheels/cp312/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#   python3 bench/gpu_check.py --out "$OUT"
#
# The list comes from pyproject.toml's [project] dependencies, so it stays in step
# with the package; pip resolves their own dependencies for the target interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
ver="${1:-3.12}"
tag="cp${ver/./}"
dest="bench/wheels/${tag}"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
mapfile -t reqs < <("$python" - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    for dep in tomllib.load(f)["project"]["dependencies"]:
        print(dep)
PY
)
rm -rf "$dest"
mkdir -p "$dest"
"$python" -m pip download --quiet --only-binary=:all: \
    --python-version "$ver" --implementation cp --abi "$tag" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$dest" "${reqs[@]}"
echo "$(ls "$dest" | wc -l) wheels, $(du -sh "$dest" | cut -f1), in $dest:"
ls "$dest"
