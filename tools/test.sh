#!/usr/bin/env bash
# Sets up .venv with jobworker and its test extras, then runs the test suite (extra arguments
# go to pytest). Real cgroups are used: run as root (the cgroup tests are skipped otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
exec .venv/bin/python -m pytest "$@"
