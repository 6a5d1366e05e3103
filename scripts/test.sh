#!/usr/bin/env bash
# The single command that runs every test of meshd, on a fresh machine or a used one:
#   1. a Python venv at <repo>/.venv with tests/interop/requirements.txt (reinstalled only when
#      the requirements or the interpreter change),
#   2. cargo build --all-targets, then cargo test --all-targets,
#   3. the interop tests (pytest tests/interop) against the freshly built target/debug/meshd,
#   4. a short run of every cargo-fuzz target (scripts/fuzz.sh; FUZZ_SECONDS each, default 20).
# Exits non-zero if anything fails. A skipped interop test is a failure (tests/interop/conftest.py
# turns every skip into a failure and prints its reason).
#
# Needs the Rust toolchain and python3, and root for the sidecar interop tests (network namespaces,
# iptables): as root on Debian it installs python3-venv, iproute2, iptables and util-linux when
# missing. Environment: PYTHON (default python3) picks the interpreter for the venv; MESHD_BIN
# overrides the binary the interop tests run; extra arguments are passed to pytest (e.g.
# scripts/test.sh -k reflection).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

section() { printf '\n==> %s\n' "$*"; }

VENV="$ROOT/.venv"
REQ="$ROOT/tests/interop/requirements.txt"
PYTHON="${PYTHON:-python3}"

section "Python venv: $VENV"
if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  rm -rf "$VENV"
  if ! "$PYTHON" -m venv "$VENV"; then
    # Debian's python3 ships venv/ensurepip in a separate package.
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      echo "python3 -m venv failed; installing python3-venv"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
      rm -rf "$VENV"
      "$PYTHON" -m venv "$VENV"
    else
      echo "error: '$PYTHON -m venv' failed; install the venv module (Debian: python3-venv)" >&2
      exit 1
    fi
  fi
fi
"$VENV/bin/python" -VV
stamp="$VENV/.interop-requirements.sha256"
want="$( { sha256sum <"$REQ"; "$VENV/bin/python" -VV; } | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ]; then
  echo "requirements unchanged since the last install; not reinstalling"
else
  rm -f "$stamp"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$REQ"
  echo "$want" >"$stamp"
  echo "installed $(grep -cE '^[A-Za-z]' "$REQ") pinned packages"
fi

section "system tools for the sidecar harness (ip netns, iptables, setpriv)"
# tests/interop/netns.py makes pods as network namespaces with istio-init's iptables rules and runs
# Envoy as uid 1337; it needs root and these tools, and fails its tests with the reason otherwise.
missing_pkgs=()
command -v ip >/dev/null 2>&1 || missing_pkgs+=(iproute2)
{ command -v iptables && command -v iptables-restore && command -v iptables-save; } >/dev/null 2>&1 \
  || missing_pkgs+=(iptables)
command -v setpriv >/dev/null 2>&1 || missing_pkgs+=(util-linux)
if [ "${#missing_pkgs[@]}" -eq 0 ]; then
  echo "ip, iptables and setpriv are installed"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing ${missing_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_pkgs[@]}"
else
  echo "warning: ${missing_pkgs[*]} missing and not installable here (needs root and apt-get);" \
    "the sidecar interop tests will fail" >&2
fi
if [ "$(id -u)" != 0 ]; then
  echo "warning: not root: the sidecar interop tests (network namespaces, iptables) will fail" >&2
fi

section "cargo build --all-targets"
cargo build --all-targets

section "cargo test --all-targets"
cargo test --all-targets

section "interop tests (pytest tests/interop)"
TARGET_DIR="$(cargo metadata --no-deps --format-version 1 \
  | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
export MESHD_BIN="${MESHD_BIN:-$TARGET_DIR/debug/meshd}"
if [ ! -x "$MESHD_BIN" ]; then
  echo "error: meshd binary $MESHD_BIN is missing after the build" >&2
  exit 1
fi
echo "MESHD_BIN=$MESHD_BIN"
export PYTHONDONTWRITEBYTECODE=1
"$VENV/bin/python" -m pytest tests/interop \
  -p no:cacheprovider -rfEsx --strict-markers -o xfail_strict=true "$@"

section "fuzz smoke run (scripts/fuzz.sh: cargo fuzz, every target ${FUZZ_SECONDS:-20}s)"
# Installs the pinned cargo-fuzz if missing, builds every target in fuzz/ and runs each for
# FUZZ_SECONDS; a crash, a failed assertion, or failing to install or build fails this script.
# Longer runs: docs/fuzzing.md.
FUZZ_PROFILE="${FUZZ_PROFILE:-dev}" bash "$ROOT/scripts/fuzz.sh" "${FUZZ_SECONDS:-20}"
