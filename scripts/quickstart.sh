#!/usr/bin/env bash
# README's "run it" command, on embedded defaults with nothing to configure.
#
# Today it runs the core demo: generate a sample image, chunk it, write the chunk index and
# chunk objects to a temporary store, build and sign a release manifest under a fresh trust
# root, verify it as an agent would, reassemble the image from the store and check its
# SHA-256, printing each step. As issues 4-6 land it grows into the real thing: start a
# coordinator on SQLite and a local store, publish a release with `flotilla`, and install it
# with `flotilla-agent` into a file-backed A/B slot.
#
# Extra arguments go to the demo.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh # also sets CARGO_TARGET_DIR (default: ~/.cache/flotilla/target)

need_pkgs "${FLOTILLA_BUILD_PKGS[@]}"
need_cargo

cargo run --release --locked -p flotilla-core --example demo -- "$@"
