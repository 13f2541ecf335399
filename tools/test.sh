#!/usr/bin/env bash
# Sets up .venv with jobworker and its test extras (and the few Debian packages it needs, see
# tools/system-packages.sh), then runs the test suite (extra arguments go to pytest). Real
# cgroups and namespaces are used: run as root (those tests are skipped otherwise).
#
# Several runs may share this tree at once: each session keeps to places of its own (see
# tests/conftest.py). What they share is .venv, and (re)installing into it rewrites the entry
# points and rebuilds jobworker-cage under any run still testing. So a run sets .venv up only
# when what it is built from changed since the last setup, and then only once no other run is
# testing: runs hold a shared lock on .venv while they test; setting up takes it exclusively,
# under a second lock (on the tree) that lets one run at a time check and set up.
set -euo pipefail
cd "$(dirname "$0")/.."
built_from() {
    python3 --version
    cat pyproject.toml setup.py jobworker/supervisor/cage/cage.c tools/system-packages.sh
}
stamp=$(built_from | sha256sum)
stamp_file=.venv/.set-up-from  # the stamp of the last complete setup
fresh() {
    [[ -x .venv/bin/python && -x jobworker/supervisor/jobworker-cage ]] &&
        [[ $(cat "$stamp_file" 2>/dev/null) == "$stamp" ]]
}
exec 8<.  # the setup lock
flock 8
mkdir -p .venv
exec 9<.venv  # the use lock
if ! fresh; then
    if ! flock -n 9; then
        echo "test.sh: .venv needs setting up; waiting for the other test runs to end" >&2
        flock 9
    fi
    bash tools/system-packages.sh
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[test]'
    echo "$stamp" >"$stamp_file"
fi
flock -s 9
flock -u 8
.venv/bin/python -m pytest "$@"
