#!/usr/bin/env bash
# Runs each cargo-fuzz target under core/fuzz/ for a short time. Not part of CI.
#
#   bash scripts/fuzz.sh                       # every target, 60 s each
#   bash scripts/fuzz.sh 30                    # every target, 30 s each
#   bash scripts/fuzz.sh 600 index_decode      # one target, 10 minutes
#   FUZZ_SANITIZER=none bash scripts/fuzz.sh   # without AddressSanitizer (faster, but
#                                              # then the allocation limit is not enforced)
#
# Targets: index_decode (chunk index decoder), envelope_manifest (DSSE envelope parse,
# signature check against the `valid` fixture's trust root, manifest parse and device
# checks, trust-root rotation), chunk_object (bounded chunk object decoder).
#
# Each target starts from the committed seeds in core/fuzz/seeds/<target>/ (made from the
# attack fixtures) plus the corpus it grew on earlier runs, core/fuzz/corpus/<target>/.
# Crashing inputs land in core/fuzz/artifacts/<target>/; replay one with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>` from core/. Known reproducers are kept
# in core/fuzz/regressions/<target>/.
#
# Environment: FUZZ_SECONDS (instead of the first argument), FUZZ_SANITIZER (address|none),
# FUZZ_MALLOC_LIMIT_MB (largest single allocation a decoder may make, default 64; an input
# that makes one bigger is reported as a failure), FUZZ_TARGET_DIR.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

ALL_TARGETS=(index_decode envelope_manifest chunk_object)
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
if (($# > 0)) && [[ $1 =~ ^[0-9]+$ ]]; then
    FUZZ_SECONDS=$1
    shift
fi
FUZZ_SANITIZER="${FUZZ_SANITIZER:-address}"
FUZZ_MALLOC_LIMIT_MB="${FUZZ_MALLOC_LIMIT_MB:-64}"
[[ $FUZZ_SECONDS =~ ^[1-9][0-9]*$ ]] || die "the fuzzing time must be a whole number of seconds > 0, got '$FUZZ_SECONDS'"
[[ $FUZZ_MALLOC_LIMIT_MB =~ ^[1-9][0-9]*$ ]] || die "FUZZ_MALLOC_LIMIT_MB must be a whole number > 0"
if (($# > 0)); then targets=("$@"); else targets=("${ALL_TARGETS[@]}"); fi
for target in "${targets[@]}"; do
    [[ -f core/fuzz/fuzz_targets/$target.rs ]] || die "no fuzz target '$target' (have: ${ALL_TARGETS[*]})"
done

# libfuzzer-sys compiles libFuzzer's C++ sources.
need_pkgs "${FLOTILLA_BUILD_PKGS[@]}" g++
need_cargo
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# cargo-fuzz passes nightly-only flags (-Zsanitizer, sanitizer coverage). The machine has only
# a stable toolchain; RUSTC_BOOTSTRAP=1 makes stable rustc and cargo accept them.
export RUSTC_BOOTSTRAP=1
# Instrumented builds use other RUSTFLAGS than normal ones; a separate target dir keeps them
# from evicting each other's artifacts.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR%/}-fuzz}"

cd core # cargo fuzz looks for fuzz/ in the current directory
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
failed=()
summary=()
fuzz_stat() { sed -n "s/^stat::$2: *//p" "$logs/$1.log" | tail -1; }
for target in "${targets[@]}"; do
    log "==> fuzz $target for ${FUZZ_SECONDS} s (sanitizer: $FUZZ_SANITIZER)"
    mkdir -p "fuzz/corpus/$target"
    # The first directory is where libFuzzer adds new inputs; the seeds are only read. The
    # full output goes to a log; the terminal gets libFuzzer's progress lines and any crash.
    set +e
    cargo fuzz run --sanitizer "$FUZZ_SANITIZER" "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$FUZZ_SECONDS" -malloc_limit_mb="$FUZZ_MALLOC_LIMIT_MB" -print_final_stats=1 2>&1 |
        tee "$logs/$target.log" | grep -E --line-buffered '(pulse|DONE|INITED|ERROR|panicked|SUMMARY|Failing input|artifacts/)'
    rc=${PIPESTATUS[0]}
    set -e
    if ((rc == 0)); then
        outcome="no crash"
    else
        outcome="FAILED (exit $rc), see core/fuzz/artifacts/$target/"
        failed+=("$target")
    fi
    line="$target: $(fuzz_stat "$target" number_of_executed_units) runs, $(fuzz_stat "$target" average_exec_per_sec) exec/s"
    line+=", $(find "fuzz/corpus/$target" -type f | wc -l) inputs in corpus, peak RSS $(fuzz_stat "$target" peak_rss_mb) MB: $outcome"
    summary+=("$line")
    log "<== $line"
done

log ""
log "fuzz summary (${FUZZ_SECONDS} s each, sanitizer $FUZZ_SANITIZER):"
for line in "${summary[@]}"; do log "  $line"; done
if ((${#failed[@]} > 0)); then
    die "fuzz targets that failed: ${failed[*]}"
fi
log "fuzz: ${#targets[@]} targets, no crash"
