#!/usr/bin/env bash
# Runs the whole test suite on a fresh clone or an existing checkout: set-up with what the
# oracle tests import (idempotent: only what is missing), the test programs, then ctest.
# Tests labelled `cuda` need a GPU and are reported as skipped without one; the oracle
# tests (checks against transformers, PEFT, torchrun) must run here, not skip.
# The run ends with the ten slowest tests.
#
#   bash scripts/test.sh              # everything
#   bash scripts/test.sh -L fast      # extra arguments go to ctest (-L fast|slow|oracle|cuda, -R NAME)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bash scripts/setup.sh --tests
start=$(date +%s)
echo
echo "==> building the tests"
cmake --build build -j "$(nproc)"
echo "    built in $(( $(date +%s) - start )) s"
rm -f build/test-results/*.json
status=0
QLORA_REQUIRE_ORACLES=1 ctest --test-dir build --output-on-failure -j "$(nproc)" --timeout 900 "$@" || status=$?
python3 tests/scripts/slowest_tests.py build/test-results || true
echo "tests finished in $(( $(date +%s) - start )) s (build included)"
exit $status
