# shellcheck shell=bash
# Helpers shared by .ci/run and scripts/*.sh. Source it after cd'ing to the repository root:
#   cd "$(dirname "${BASH_SOURCE[0]}")/.." && source scripts/lib.sh
# It defines functions and sets CARGO_TARGET_DIR's default; it runs nothing else.

# Build output lives outside the clone, so a fresh clone (CI clones afresh for every run)
# reuses the dependencies an earlier run built. Set CARGO_TARGET_DIR to override.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla/target}"

# Debian packages every build needs: a C compiler and libc headers, because rustc links
# through `cc` and zstd-sys compiles zstd's C sources.
# shellcheck disable=SC2034 # used by the scripts that source this file
FLOTILLA_BUILD_PKGS=(gcc libc6-dev)

log() { printf '%s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# need_pkgs PKG... — install the Debian packages among PKG that are not installed yet.
# Does nothing (and needs no network) when all are present. Uses sudo unless run as root.
need_pkgs() {
    local pkg status missing=()
    for pkg in "$@"; do
        status="$(dpkg -s "$pkg" 2>/dev/null || true)"
        if [[ $status != *$'\nStatus: install ok installed'* ]]; then
            missing+=("$pkg")
        fi
    done
    ((${#missing[@]} > 0)) || return 0

    command -v apt-get >/dev/null || die "not installed: ${missing[*]}; no apt-get here, install them by hand"
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "not installed: ${missing[*]}; run as root or install sudo"
        sudo=(sudo)
    fi
    log "installing Debian packages: ${missing[*]}"
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# need_cargo — fail with a clear message when there is no Rust toolchain.
need_cargo() {
    command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain with rustup (rust-version is in Cargo.toml)"
}

# need_rust_lint_tools — make sure `cargo fmt` and `cargo clippy` exist.
need_rust_lint_tools() {
    need_cargo
    local missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
    ((${#missing[@]} > 0)) || return 0
    command -v rustup >/dev/null || die "cargo ${missing[*]} missing and no rustup to add them"
    rustup component add "${missing[@]}"
}

# run_step NAME CMD... — run CMD, printing NAME and how long it took. A failure ends the
# script (set -e); the EXIT trap below names the step that failed.
FLOTILLA_STEP=
FLOTILLA_STEP_START=0
run_step() {
    FLOTILLA_STEP=$1
    FLOTILLA_STEP_START=$SECONDS
    shift
    log "==> $FLOTILLA_STEP"
    "$@"
    log "<== $FLOTILLA_STEP: $((SECONDS - FLOTILLA_STEP_START)) s"
    FLOTILLA_STEP=
}

# report_steps — install with `trap report_steps EXIT`: prints the failed step, if any, and
# the total time, keeping the script's exit status.
report_steps() {
    local rc=$?
    if ((rc != 0)) && [[ -n $FLOTILLA_STEP ]]; then
        log "!!! $FLOTILLA_STEP failed after $((SECONDS - FLOTILLA_STEP_START)) s (exit $rc)"
    fi
    log "total: $SECONDS s"
    return "$rc"
}
