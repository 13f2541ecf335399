#!/usr/bin/env bash
# Sets up .venv with jobworker and its test extras (and the few Debian packages it needs, see
# tools/system-packages.sh), then runs the test suite (extra arguments go to pytest). Real
# cgroups and namespaces are used: run as root (those tests are skipped otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/system-packages.sh
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# A temporary root of our own: runs on one machine at once never clean up each other's files
# (pytest's shared /tmp/pytest-of-USER is pruned by whichever run starts next).
basetemp=$(mktemp -d /tmp/pytest-jobworker.XXXXXX)
trap 'rm -rf "$basetemp"' EXIT
.venv/bin/python -m pytest --basetemp="$basetemp" "$@"
