#!/usr/bin/env bash
# Power-cut soak: the suite's power-cut test with many more trials (default 1000).
# Each trial aborts the agent at a random named point of install or boot-check and then
# checks that the device boots a verified slot and resumes to a committed install without
# fetching any verified chunk twice.
#   device-agent/scripts/power-cut-soak.sh [TRIALS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla/target}"
export FLOTILLA_POWER_CUT_TRIALS="${1:-1000}"
exec cargo test -p flotilla-agent --test it power_cut -- --nocapture
