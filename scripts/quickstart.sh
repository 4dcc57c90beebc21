#!/usr/bin/env bash
# README's "run it" command: the main job on embedded defaults, nothing to configure.
#
#   1. starts a coordinator on SQLite and a filesystem store (in a temporary directory);
#   2. with the `flotilla` CLI: makes signing keys and a trust root, creates a product and
#      publishes a 64 MiB OS image as release 1.0.0;
#   3. a `flotilla-agent` with two file-backed A/B slots enrolls, installs 1.0.0 into its
#      inactive slot, "reboots" into it (boot-check) and commits;
#   4. 1.1.0 changes 1 MiB of the image: the agent fetches only the changed chunks and reuses
#      the rest from its active slot;
#   5. prints the device's and the coordinator's view, then stops the coordinator.
#
# Set FLOTILLA_QUICKSTART_DIR to keep the files somewhere other than a temporary directory.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh # also sets CARGO_TARGET_DIR (default: ~/.cache/flotilla/target)

need_pkgs "${FLOTILLA_BUILD_PKGS[@]}"
need_cargo

log "==> building flotilla-coordinator, flotilla and flotilla-agent (release)"
cargo build --release --locked -p flotilla-coordinator -p flotilla-publisher -p flotilla-agent
bin="$CARGO_TARGET_DIR/release"

work="${FLOTILLA_QUICKSTART_DIR:-$(mktemp -d)}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
log "==> working in $work"

coordinator_pid=
cleanup() {
    if [[ -n $coordinator_pid ]]; then
        kill "$coordinator_pid" 2>/dev/null || true
        wait "$coordinator_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. coordinator (SQLite + files under $work/coordinator)"
FLOTILLA_DATA_DIR="$work/coordinator" FLOTILLA_LISTEN=127.0.0.1:0 RUST_LOG=warn \
    "$bin/flotilla-coordinator" >"$work/coordinator.out" 2>"$work/coordinator.log" &
coordinator_pid=$!
for _ in $(seq 1 300); do
    grep -q '^listening on ' "$work/coordinator.out" 2>/dev/null && break
    kill -0 "$coordinator_pid" 2>/dev/null || die "the coordinator exited: $(cat "$work/coordinator.log")"
    sleep 0.1
done
url="$(sed -n 's/^listening on //p' "$work/coordinator.out")"
[[ -n $url ]] || die "the coordinator did not start: $(cat "$work/coordinator.log")"
echo "coordinator at $url"

export FLOTILLA_CONFIG_DIR="$work/publisher"
export FLOTILLA_URL="$url"
FLOTILLA_TOKEN="$(cat "$work/coordinator/admin-token")"
export FLOTILLA_TOKEN
flotilla() { "$bin/flotilla" "$@"; }
secret="quickstart-enrollment-secret"

step "2. keys, trust root, product, release 1.0.0"
flotilla keys generate --name root
flotilla keys generate --name release
flotilla root init --root-key "$FLOTILLA_CONFIG_DIR/keys/root.pem" \
    --release-key "$FLOTILLA_CONFIG_DIR/keys/release.pem" --out "$work/trust-root.json"
flotilla product create demo --trust-root "$work/trust-root.json" --enrollment-secret "$secret"
head -c $((64 << 20)) /dev/urandom >"$work/os-1.0.0.img"
flotilla release --product demo --image "$work/os-1.0.0.img" --version 1.0.0 --rollout 100

step "3. the device installs 1.0.0 into its inactive slot, boots it and commits"
device="$work/device"
mkdir -p "$device"
cp "$work/trust-root.json" "$device/trust-root.json"
cat >"$device/agent.toml" <<TOML
coordinator = "$url"
product = "demo"
enrollment_secret = "$secret"
trust_root = "$device/trust-root.json"
state_dir = "$device/state"

[device_id]
value = "quickstart-device-1"

[slots]
kind = "file"
a = "$device/slot-a.img"
b = "$device/slot-b.img"

[bootloader]
kind = "env-file"          # a file holding BOOT_ORDER / BOOT_x_LEFT, as U-Boot or GRUB would
path = "$device/bootenv"
booted = "simulate"        # the "reboot" is simulated: the slot the env selects is the one booted

[health]
boot_attempts = 3
check_timeout = "10s"
TOML
agent() { RUST_LOG=warn "$bin/flotilla-agent" --config "$device/agent.toml" "$@"; }
agent check-once
agent boot-check
agent status

step "4. release 1.1.0 changes 1 MiB; the device fetches only the changed chunks"
cp "$work/os-1.0.0.img" "$work/os-1.1.0.img"
head -c $((1 << 20)) /dev/urandom | dd of="$work/os-1.1.0.img" bs=1M seek=20 conv=notrunc status=none
flotilla release --product demo --image "$work/os-1.1.0.img" --version 1.1.0 --rollout 100
agent check-once
agent boot-check
agent status
cmp "$device/slot-a.img" "$work/os-1.1.0.img" && echo "slot A holds exactly 1.1.0's image"

step "5. the coordinator's view"
agent flush-events || true
flotilla releases list --product demo
flotilla devices list --product demo
echo
echo "Done. Files are in $work; the coordinator has been stopped."
