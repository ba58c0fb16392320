#!/usr/bin/env bash
# Prepare the GPU check (run here, where PyPI is reachable; the GPU machine has no network).
#
# Downloads the exact wheels the GPU machine lacks (benchmarks/gpu_wheels.py: CARRIED, at the
# versions constraints.txt pins) for CPython 3.12 / manylinux x86_64 into .whl/ (ignored by
# git, so it travels only when a device call names it in `carry`), builds a wheel of curvkit
# itself from this working tree, and checks that the folder is complete (every requirement of
# curvkit[test] met by the folder or the machine's packages, resolved by pip for Python 3.12)
# and that it travels within 64 MiB. Then the one device command (docs/benchmarks.md, "GPU"):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && \
#     PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py
#
# Rerun this script after changing curvkit/ or plugins/: the curvkit wheel is a copy of the
# tree (gpu_check.py reports a stale wheel). Usage: benchmarks/gpu_prepare.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-.venv/bin/python}}"
WHL=.whl

if ! git check-ignore -q "$WHL/"; then
  echo "gpu_prepare: $WHL/ is not ignored by git (it must not be committed); add '/.whl/' to .gitignore" >&2
  exit 1
fi
rm -rf "$WHL"
mkdir -p "$WHL"

mapfile -t REQS < <("$PY" benchmarks/gpu_wheels.py requirements)
echo "downloading ${#REQS[@]} wheels for CPython 3.12: ${REQS[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$WHL" "${REQS[@]}"

echo "building the curvkit wheel from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- curvkit plugins pyproject.toml || echo ' + uncommitted changes')"
BUILD=$(mktemp -d)
"$PY" -m pip wheel -q --no-deps -w "$BUILD" .
cp "$BUILD"/curvkit-*.whl "$WHL"/
rm -rf "$BUILD" build

ls -l "$WHL"
du -sh "$WHL"
"$PY" benchmarks/gpu_wheels.py check "$WHL"
