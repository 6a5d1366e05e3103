#!/usr/bin/env bash
# Builds and runs meshd's cargo-fuzz targets (fuzz/, docs/fuzzing.md) for a fixed time each.
#
#   bash scripts/fuzz.sh                  # every target, FUZZ_SECONDS (default 20) each
#   bash scripts/fuzz.sh 600 jwt csr      # 10 minutes each for jwt and csr
#
# Works on the stable toolchain: cargo-fuzz's nightly-only flags (-Zsanitizer, -Cpasses=sancov)
# are let through with RUSTC_BOOTSTRAP=1. cargo-fuzz itself is installed once, at a pinned
# version, under $MESHD_TOOLS_DIR (default ~/.cache/meshd-tools) and reused from there.
#
# Each run starts from the committed seeds (fuzz/corpus/<target>/seed-*) plus a scratch corpus
# dir; with FUZZ_KEEP_CORPUS=1 new inputs are kept in fuzz/corpus/<target>/ (gitignored) so
# long runs build on each other. A crash, a failed assertion, a timeout or an out-of-memory stops
# that target, leaves the input in fuzz/artifacts/<target>/ and makes this script exit non-zero;
# so does failing to install or build cargo-fuzz (nothing is skipped).
#
# Build cost: the targets link all of meshd built with coverage instrumentation and ASan, a
# separate build from `cargo build` (about 30 CPU-minutes from nothing, about 10 to rebuild meshd
# itself, which a fresh clone always does). The build therefore goes to a target dir outside the
# work tree, $FUZZ_TARGET_DIR (default $MESHD_TOOLS_DIR/fuzz-target), which later runs and other
# clones on the same machine reuse.
#
# Environment: FUZZ_SECONDS (per target), FUZZ_SANITIZER (address | none; default address),
# FUZZ_KEEP_CORPUS, FUZZ_TARGET_DIR, MESHD_TOOLS_DIR, FUZZ_EXTRA_ARGS (more libFuzzer flags).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CARGO_FUZZ_VERSION=0.13.2
ALL_TARGETS=(csr jwt kubeconfig admission xds_requests)
SECONDS_EACH="${1:-${FUZZ_SECONDS:-20}}"
shift $(($# > 0 ? 1 : 0))
TARGETS=("$@")
[ "${#TARGETS[@]}" -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")
SANITIZER="${FUZZ_SANITIZER:-address}"
TOOLS="${MESHD_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/meshd-tools}"
FUZZ_ROOT="$TOOLS/cargo-fuzz-$CARGO_FUZZ_VERSION"

log() { printf '[fuzz] %s\n' "$*"; }

if ! "$FUZZ_ROOT/bin/cargo-fuzz" --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
  log "installing cargo-fuzz $CARGO_FUZZ_VERSION into $FUZZ_ROOT"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$FUZZ_ROOT"
fi
export PATH="$FUZZ_ROOT/bin:$PATH"
log "$(cargo fuzz --version), rustc $(rustc --version | cut -d' ' -f2), sanitizer $SANITIZER"

# cargo-fuzz passes nightly-only rustc flags; stable accepts them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
TARGET_DIR="${FUZZ_TARGET_DIR:-$TOOLS/fuzz-target}"
BUILD_FLAGS=(--sanitizer "$SANITIZER" --codegen-units 16 --target-dir "$TARGET_DIR")
# FUZZ_PROFILE=dev builds without optimizations: a much shorter build from nothing, for
# smoke runs where exec/s matters less than finishing CI (the test command uses it).
PROFILE_DIR=release
if [ "${FUZZ_PROFILE:-release}" = dev ]; then
  BUILD_FLAGS+=(--dev)
  PROFILE_DIR=debug
fi

start=$(date +%s)
log "building ${#ALL_TARGETS[@]} targets (cargo fuzz build ${BUILD_FLAGS[*]})"
cargo fuzz build "${BUILD_FLAGS[@]}"
log "built in $(($(date +%s) - start))s"
# The binaries are run directly: `cargo fuzz run` would rebuild first whenever src/ changed
# since, which in a shared work tree can be minutes per target.
BIN_DIR="$TARGET_DIR/x86_64-unknown-linux-gnu/$PROFILE_DIR"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
passed=0
failed=()
summary=()
for t in "${TARGETS[@]}"; do
  seeds="fuzz/corpus/$t"
  if [ ! -d "$seeds" ]; then
    echo "error: no seed corpus $seeds (targets: ${ALL_TARGETS[*]})" >&2
    exit 2
  fi
  if [ "${FUZZ_KEEP_CORPUS:-0}" = 1 ]; then
    dirs=("$seeds")
  else
    mkdir -p "$scratch/$t"
    dirs=("$scratch/$t" "$seeds")
  fi
  mkdir -p "fuzz/artifacts/$t"
  out="$scratch/$t.log"
  log "running $t for ${SECONDS_EACH}s"
  # shellcheck disable=SC2086
  if "$BIN_DIR/$t" "${dirs[@]}" \
    -max_total_time="$SECONDS_EACH" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$t/" ${FUZZ_EXTRA_ARGS:-} >"$out" 2>&1; then
    passed=$((passed + 1))
    result=ok
  else
    failed+=("$t")
    result=FAILED
    tail -n 60 "$out"
    log "$t FAILED; the input is in fuzz/artifacts/$t/ (reproduce: $BIN_DIR/$t fuzz/artifacts/$t/<file>; docs/fuzzing.md)"
  fi
  # libFuzzer's final stats: runs, exec/s, coverage, features, corpus size.
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -n 1)"
  eps="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out" | tail -n 1)"
  last="$(grep -E '^#[0-9]+' "$out" | tail -n 1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' || true)"
  summary+=("$(printf '%-13s %-6s runs: %-8s exec/s: %-6s %s' "$t" "$result" "${runs:-?}" "${eps:-?}" "$last")")
done

log "summary (${SECONDS_EACH}s per target, total $(($(date +%s) - start))s with the build):"
printf '  %s\n' "${summary[@]}"
echo "fuzz: $passed passed, ${#failed[@]} failed"
[ "${#failed[@]}" -eq 0 ]
