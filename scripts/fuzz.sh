#!/usr/bin/env bash
# Runs each cargo-fuzz target under core/fuzz/ for a short time. Not part of CI.
#
#   bash scripts/fuzz.sh                    # every target, 30 s each
#   FUZZ_SECONDS=600 bash scripts/fuzz.sh index_decode
#   FUZZ_SANITIZER=none bash scripts/fuzz.sh   # without AddressSanitizer (faster)
#
# Crashing inputs land in core/fuzz/artifacts/<target>/, the growing corpus in
# core/fuzz/corpus/<target>/. Replay one with `cargo fuzz run <target> <file>` from core/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

ALL_TARGETS=(index_decode envelope_manifest chunk_object)
FUZZ_SECONDS="${FUZZ_SECONDS:-30}"
FUZZ_SANITIZER="${FUZZ_SANITIZER:-address}"
[[ $FUZZ_SECONDS =~ ^[1-9][0-9]*$ ]] || die "FUZZ_SECONDS must be a whole number of seconds > 0, got '$FUZZ_SECONDS'"
if (($# > 0)); then targets=("$@"); else targets=("${ALL_TARGETS[@]}"); fi

# libfuzzer-sys compiles libFuzzer's C++ sources.
need_pkgs "${FLOTILLA_BUILD_PKGS[@]}" g++
need_cargo
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# cargo-fuzz passes nightly-only flags (-Zsanitizer, sanitizer coverage). The machine has only
# a stable toolchain; RUSTC_BOOTSTRAP=1 makes stable rustc and cargo accept them.
export RUSTC_BOOTSTRAP=1
# Instrumented builds use other RUSTFLAGS than normal ones; a separate target dir keeps them
# from evicting each other's artifacts.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR%/}-fuzz}"

cd core # cargo fuzz looks for fuzz/ in the current directory
failed=()
for target in "${targets[@]}"; do
    log "==> fuzz $target for ${FUZZ_SECONDS} s (sanitizer: $FUZZ_SANITIZER)"
    if cargo fuzz run --sanitizer "$FUZZ_SANITIZER" "$target" -- -max_total_time="$FUZZ_SECONDS"; then
        log "<== $target: no crash"
    else
        log "!!! $target: failed, see core/fuzz/artifacts/$target/"
        failed+=("$target")
    fi
done

if ((${#failed[@]} > 0)); then
    die "fuzz targets that failed: ${failed[*]}"
fi
log "fuzz: ${#targets[@]} targets, ${FUZZ_SECONDS} s each, no crash"
