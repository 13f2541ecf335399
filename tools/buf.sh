#!/usr/bin/env bash
# Lints schema/ with buf's STANDARD rules and checks it against the API as last landed (buf
# breaking, FILE rules: see schema/buf.yaml), the way CI does:
#
#     bash tools/buf.sh          # installs buf on first use (npm registry, @bufbuild/buf)
#
# The baseline is the commit named in schema/BREAKING_BASELINE: the main that last landed.
# Raise it to the new main's parent when a change lands; a break that is meant (never, once v1
# is in users' hands) must say so there, in the commit that moves it.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF_VERSION=1.75.0
prefix=tools/.cache/buf-$BUF_VERSION
buf=$prefix/node_modules/.bin/buf
mkdir -p tools/.cache
exec 7>tools/.cache/buf.lock
flock 7  # two runs at once must not both install into one prefix
if [[ ! -x $buf ]]; then
    if ! command -v npm >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
    fi
    npm install --silent --no-audit --no-fund --prefix "$prefix" "@bufbuild/buf@$BUF_VERSION"
fi
flock -u 7
baseline=$(grep -v '^#' schema/BREAKING_BASELINE | head -n 1)
if ! git cat-file -e "$baseline^{commit}" 2>/dev/null; then
    echo "buf.sh: the baseline commit $baseline (schema/BREAKING_BASELINE) is not in this" \
        "clone; a shallow clone cannot be checked for breaking changes" >&2
    exit 1
fi
"$buf" lint schema
"$buf" breaking schema --against ".git#ref=$baseline,subdir=schema"
echo "buf: schema/ is lint-clean and keeps every promise of $baseline"
