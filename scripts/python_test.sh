#!/usr/bin/env bash
# python_test.sh — the Python package's tests (python/tests): builds and installs ./python
# (libmoegen with it) into the machine's virtual environment for them (scripts/setup.sh python:
# $MOEGEN_PYENV, default ~/.cache/moegen/pyenv, with PyTorch), then runs pytest there.
# Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(scripts/setup.sh python) # an absolute path
"$python" -m pip install -q --disable-pip-version-check pytest pyyaml numpy
"$python" -m pip install -q --disable-pip-version-check ./python
cd python/tests # not python/: its moegen/ sources must not shadow the installed package
exec "$python" -m pytest -q -p no:cacheprovider . "$@"
