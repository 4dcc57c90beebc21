#!/usr/bin/env bash
# README's test command: installs what the tests need, then runs every test in the workspace.
# Extra arguments go to `cargo test`, e.g. `bash scripts/test.sh -p flotilla-core`.
# .ci/run calls it as its last step.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh # also sets CARGO_TARGET_DIR (default: ~/.cache/flotilla/target)

# Tests that need a real service install and start it here; a test that cannot find its
# service fails, it never skips. The coordinator's tests run against a real PostgreSQL; the
# mesh's site test puts each agent in its own network namespace (ip, tc: iproute2; needs root);
# the agent's trust-root test forges a coordinator's chain with sqlite3; its block-slot test
# uses loop devices (losetup: util-linux; needs root).
need_pkgs "${FLOTILLA_BUILD_PKGS[@]}" postgresql iproute2 sqlite3 util-linux
need_cargo

if [[ -z ${FLOTILLA_TEST_PG_URL:-} ]]; then
    eval "$(bash scripts/pg.sh start)"
    trap 'bash scripts/pg.sh stop "$FLOTILLA_TEST_PG_DIR"; rm -f "$results"' EXIT
fi

# cargo test ends with one "test result" line per test binary, and the last one is often a
# placeholder crate's empty doc-test run; close with the totals so a reader of the log sees
# how many tests ran in all.
results="$(mktemp)"
[[ -n ${FLOTILLA_TEST_PG_DIR:-} ]] || trap 'rm -f "$results"' EXIT
status=0
cargo test --workspace --locked "$@" | tee "$results" || status=$?
# The SDK's Python binding, built and run against a real coordinator (with no extra arguments).
[[ $# -gt 0 ]] || bash sdk-bindings/tests/python.sh || { status=1; log "error: the SDK's Python binding test failed (bash sdk-bindings/tests/python.sh)"; }
awk '/^test result: / {
        for (i = 2; i <= NF; i++) {
            if ($i ~ /^passed;?$/) passed += $(i - 1)
            if ($i ~ /^failed;?$/) failed += $(i - 1)
            if ($i ~ /^ignored;?$/) ignored += $(i - 1)
        }
    }
    END { printf "tests: %d passed, %d failed, %d skipped\n", passed, failed, ignored }' "$results"
exit "$status"
