#!/usr/bin/env bash
# Sets up .venv with Rosetta and everything its tests and benchmarks compare against.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned to the build the reference libraries (open_clip needs torchvision) agree on.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"
echo "Rosetta is installed in .venv (activate it with: source .venv/bin/activate)"
