#!/usr/bin/env bash
# Installs the Debian packages jobworker needs and the machine lacks (as root; a no-op when
# everything is there):
#   gcc, libc6-dev   build jobworker-cage, the small static program that cages each job
#                    (jobworker/supervisor/cage/cage.c), when pip installs jobworker
#   python3          /usr/bin/python3 for the tests' jobs: a job runs as a transient user,
#                    which cannot execute an interpreter kept under root's home (pyenv's)
set -euo pipefail
need=()
command -v gcc >/dev/null || need+=(gcc)
# gcc names the file it would link with, or only its bare name when there is none.
[[ $(gcc -print-file-name=libc.a 2>/dev/null) == /* ]] || need+=(libc6-dev)
[[ -x /usr/bin/python3 ]] || need+=(python3)
if ((${#need[@]})); then
    echo "installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
