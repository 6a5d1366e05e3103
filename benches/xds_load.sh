#!/usr/bin/env bash
# The xDS benchmark (BENCHMARKS.md, "xDS"): RUNS runs of examples/xds_bench.rs, each a fresh
# two-cluster fake mesh (1,000 services) and, per stream count, a fresh release meshd as a child
# process loaded by meshd::bench::xds over the plaintext ADS port. Prints the medians over runs.
#
# Environment knobs (defaults in brackets):
#   STREAMS ["1000,10000"]  DELTA_PERCENT [50]  SERVICES [1000]  CHANGES [10]  PUSHES [5]
#   STREAMS_PER_CONN [1]  RUNS [3]  NETWORKS [1; 2 splits clusters and proxies over two networks]
#   NO_BUILD [unset; 1 reuses the built binaries]
#   OUT [a new temp dir; every run's JSON summary and log is kept there]
#   EXTRA [unset; more xds_bench flags]
set -euo pipefail

cd "$(dirname "$0")/.."

STREAMS=${STREAMS:-1000,10000}
DELTA_PERCENT=${DELTA_PERCENT:-50}
SERVICES=${SERVICES:-1000}
CHANGES=${CHANGES:-10}
PUSHES=${PUSHES:-5}
STREAMS_PER_CONN=${STREAMS_PER_CONN:-1}
NETWORKS=${NETWORKS:-1}
RUNS=${RUNS:-3}

command -v jq >/dev/null || { echo "xds_load.sh: jq is required" >&2; exit 1; }

if [ "${NO_BUILD:-0}" != 1 ]; then
    cargo build --release --features testing --example xds_bench --bin meshd
fi
for b in target/release/meshd target/release/examples/xds_bench; do
    [ -x "$b" ] || { echo "xds_load.sh: $b is missing" >&2; exit 1; }
done

# 10,000 client sockets in this process (and as many in meshd's).
ulimit -n 20000 2>/dev/null || true

OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/meshd-xds-load.XXXXXX")}
mkdir -p "$OUT"
echo "xds_load.sh: results in $OUT" >&2

for run in $(seq 1 "$RUNS"); do
    echo "=== run $run/$RUNS ($(date -u +%H:%M:%S) UTC)" >&2
    # shellcheck disable=SC2086
    target/release/examples/xds_bench --meshd target/release/meshd --streams "$STREAMS" \
        --delta-percent "$DELTA_PERCENT" --services "$SERVICES" --changes "$CHANGES" \
        --pushes "$PUSHES" --streams-per-conn "$STREAMS_PER_CONN" --networks "$NETWORKS" \
        --json-out "$OUT/run$run.json" ${EXTRA:-} >/dev/null 2> >(tee "$OUT/run$run.log" >&2)
done

# Medians over runs, per stream count.
jq -s -r '
  def median: map(select(type == "number")) | sort
    | if length == 0 then null elif length % 2 == 1 then .[length/2|floor] else (.[length/2-1] + .[length/2]) / 2 end;
  def f: if type == "number" then . * 10 | round / 10 else "-" end;
  (.[0].scenarios | map(.streams)) as $ns
  | ["streams", "runs", "KiB/stream", "RSS MiB", "sync s", "eds p50 ms", "eds p99 ms", "eds max ms",
     "push p50 ms", "push max ms", "share eds", "share full", "eds KiB/chg"],
    ($ns[] as $n
     | [.[] | .scenarios[] | select(.streams == $n)] as $s
     | [$n, ($s | length),
        ($s | map(.rss_per_stream_kib) | median | f),
        ($s | map([.rss_ready_mib, .rss_settled_mib] | max) | median | f),
        ($s | map(.initial_sync_s) | median | f),
        ($s | map(.endpoint_p50_ms_median) | median | f),
        ($s | map(.endpoint_p99_ms_median) | median | f),
        ($s | map(.endpoint_max_ms_median) | median | f),
        ($s | map(.full_push_p50_ms_median) | median | f),
        ($s | map(.full_push_max_ms_median) | median | f),
        ($s | map(.share_endpoint_change.ratio) | median | f),
        ($s | map(.share_full_push.ratio) | median | f),
        ($s | map(.eds_bytes_per_change_median / 1024) | median | f)])
  | @tsv' "$OUT"/run*.json | column -t -s "$(printf '\t')"
