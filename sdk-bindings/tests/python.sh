#!/usr/bin/env bash
# The SDK's Python binding, end to end, as CI runs it (scripts/test.sh calls this):
#   1. builds flotilla-coordinator, the `flotilla` CLI, flotilla-sdk's cdylib and its
#      uniffi-bindgen, and generates the Python module into a temporary directory;
#   2. starts a coordinator on SQLite and a filesystem store on a free port;
#   3. with the CLI: makes a root and a release key and the trust root;
#   4. runs tests/python/test_sdk.py (plain unittest), which creates a product per test and
#      publishes bundle releases with the same CLI, then drives an app's update flow through
#      the binding: check, download and stage with progress, restart, mark healthy, the next
#      release, and both rollback paths.
# Extra arguments go to unittest, e.g. `bash sdk-bindings/tests/python.sh -k rollback`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh # also sets CARGO_TARGET_DIR (default: ~/.cache/flotilla/target)

need_cargo
command -v python3 >/dev/null || need_pkgs python3

log "==> building the coordinator, the CLI, flotilla-sdk and uniffi-bindgen"
cargo build --quiet --locked -p flotilla-coordinator --bin flotilla-coordinator
cargo build --quiet --locked -p flotilla-publisher --bin flotilla
cargo build --quiet --locked -p flotilla-sdk --features cli --lib --bin uniffi-bindgen
bin="$CARGO_TARGET_DIR/debug"

work="$(mktemp -d)"
coordinator_pid=
cleanup() {
    if [[ -n $coordinator_pid ]]; then
        kill "$coordinator_pid" 2>/dev/null || true
        wait "$coordinator_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

log "==> generating the Python module"
mkdir -p "$work/py"
"$bin/uniffi-bindgen" generate --library "$bin/libflotilla_sdk.so" --language python \
    --out-dir "$work/py" >/dev/null
cp "$bin/libflotilla_sdk.so" "$work/py/"

log "==> starting a coordinator (SQLite + files)"
# Its first stdout line names the address; read it from a FIFO, so nothing polls.
mkfifo "$work/coordinator.out"
FLOTILLA_DATA_DIR="$work/coordinator" FLOTILLA_LISTEN=127.0.0.1:0 RUST_LOG=warn \
    "$bin/flotilla-coordinator" >"$work/coordinator.out" 2>"$work/coordinator.log" &
coordinator_pid=$!
exec 3<"$work/coordinator.out"
line=
read -r -t 120 line <&3 || true
cat <&3 >/dev/null &
url="${line#listening on }"
[[ $line == "listening on "* ]] || die "the coordinator did not start: $(cat "$work/coordinator.log")"

export FLOTILLA_CONFIG_DIR="$work/publisher"
export FLOTILLA_URL="$url"
FLOTILLA_TOKEN="$(cat "$work/coordinator/admin-token")"
export FLOTILLA_TOKEN
"$bin/flotilla" keys generate --name root >/dev/null
"$bin/flotilla" keys generate --name release >/dev/null
"$bin/flotilla" root init --root-key "$FLOTILLA_CONFIG_DIR/keys/root.pem" \
    --release-key "$FLOTILLA_CONFIG_DIR/keys/release.pem" --out "$work/trust-root.json" >/dev/null

log "==> running sdk-bindings/tests/python/test_sdk.py against $url"
PYTHONPATH="$work/py" \
    FLOTILLA_SDK_TEST_WORK="$work" \
    FLOTILLA_SDK_TEST_CLI="$bin/flotilla" \
    FLOTILLA_SDK_TEST_TRUST_ROOT="$work/trust-root.json" \
    python3 sdk-bindings/tests/python/test_sdk.py -v "$@"
