#!/usr/bin/env bash
# Runs the whole test suite on a fresh clone or an existing checkout:
# set-up (idempotent: only what is missing), build, then every ctest.
# Tests labelled `cuda` need a GPU and are reported as skipped without one.
#
#   bash scripts/test.sh              # everything
#   bash scripts/test.sh -R Config    # extra arguments go to ctest
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bash scripts/setup.sh
start=$(date +%s)
ctest --test-dir build --output-on-failure -j "$(nproc)" --timeout 600 "$@"
echo "tests finished in $(( $(date +%s) - start )) s"
