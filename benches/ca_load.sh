#!/usr/bin/env bash
# End-to-end CreateCertificate load over TLS, per CA key type: see BENCHMARKS.md.
#
# For each CA key type (ecdsa-p256 with P-256 workload CSRs, rsa-2048 with RSA-2048 CSRs, as
# istio-agent sends by default) this starts `meshd serve` on a fresh data dir with every port on
# 127.0.0.1:0, runs `meshd bench ca` RUNS times against it with --server-pid, and prints the
# median of each figure. The load client shares the machine's cores with the server; the
# "per server CPU-second" figure is what makes the comparison with the raw limit fair.
#
# Environment knobs (defaults in brackets):
#   KEY_TYPES ["ecdsa-p256 rsa-2048"]  CONCURRENCY [50]  CONNECTIONS [1]  DURATION [15s]
#   WARMUP [2s]  RUNS [3]  NO_BUILD [unset; set to 1 to reuse target/release/meshd]
#   OUT [unset; directory where every run's JSON and the server logs are kept]
#   BIN [target/release/meshd]
#   TRANSPORT [unset; set to 1 to also drive grpc.health.v1.Health/Check on the same server, over
#             TLS and over the plaintext port: the transport floor the CA's figure is compared to]
set -euo pipefail

cd "$(dirname "$0")/.."

KEY_TYPES=${KEY_TYPES:-"ecdsa-p256 rsa-2048"}
CONCURRENCY=${CONCURRENCY:-50}
CONNECTIONS=${CONNECTIONS:-1}
DURATION=${DURATION:-15s}
WARMUP=${WARMUP:-2s}
RUNS=${RUNS:-3}

command -v jq >/dev/null || { echo "ca_load.sh: jq is required" >&2; exit 1; }

if [ "${NO_BUILD:-0}" != 1 ]; then
    cargo build --release
fi
BIN=${BIN:-target/release/meshd}
[ -x "$BIN" ] || { echo "ca_load.sh: $BIN is missing" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/meshd-ca-load.XXXXXX")
SERVER_PID=""

stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}

cleanup() {
    stop_server
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT"
        cp -r "$WORK"/*.json "$WORK"/*.log "$OUT"/ 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Median of the numbers on stdin (one per line); "null" when there are none.
median() {
    sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "null"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "load: --concurrency $CONCURRENCY --connections $CONNECTIONS --duration $DURATION --warmup $WARMUP, $RUNS runs per key type"

for KT in $KEY_TYPES; do
    DATA="$WORK/data-$KT"
    LOG="$WORK/server-$KT.log"
    "$BIN" serve \
        --data-dir "$DATA" \
        --ca-key-type "$KT" \
        --grpc-addr 127.0.0.1:0 \
        --plaintext-addr 127.0.0.1:0 \
        --monitoring-addr 127.0.0.1:0 \
        --ready-addr 127.0.0.1:0 \
        --webhook-addr 127.0.0.1:0 \
        --log-format text \
        2>"$LOG" &
    SERVER_PID=$!

    ADDR=""
    PLAIN_ADDR=""
    DEADLINE=$((SECONDS + 30))
    while [ -z "$ADDR" ]; do
        ADDR=$(sed -n 's/.*listener=grpc-tls addr=\([0-9.]*:[0-9]*\).*/\1/p' "$LOG" | head -n1)
        PLAIN_ADDR=$(sed -n 's/.*listener=grpc-plaintext addr=\([0-9.]*:[0-9]*\).*/\1/p' "$LOG" | head -n1)
        [ -n "$ADDR" ] && [ -n "$PLAIN_ADDR" ] && break
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "ca_load.sh: meshd serve exited; its log:" >&2
            cat "$LOG" >&2
            exit 1
        fi
        if [ "$SECONDS" -ge "$DEADLINE" ]; then
            echo "ca_load.sh: no grpc-tls listener after 30s; log:" >&2
            cat "$LOG" >&2
            exit 1
        fi
        sleep 0.1
    done

    echo
    echo "== CA $KT, CSR $KT: meshd serve pid $SERVER_PID on $ADDR"
    for RUN in $(seq 1 "$RUNS"); do
        J="$WORK/$KT-run$RUN.json"
        "$BIN" bench ca \
            --addr "$ADDR" \
            --data-dir "$DATA" \
            --key-type "$KT" \
            --concurrency "$CONCURRENCY" \
            --connections "$CONNECTIONS" \
            --duration "$DURATION" \
            --warmup "$WARMUP" \
            --server-pid "$SERVER_PID" \
            --json >"$J"
        jq -r --arg run "$RUN" '"run \($run): rps \(.rps|floor)  p50 \(.latency_ms.p50*100|round/100) ms  p90 \(.latency_ms.p90*100|round/100) ms  p99 \(.latency_ms.p99*100|round/100) ms  server CPU \(.server_cpu_s*100|round/100) s  client CPU \(.client_cpu_s*100|round/100) s  other CPU \(.other_cpu_s*100|round/100) s  OK/server-CPU-s \(.ok_per_server_cpu_s|floor)  raw sign \(.raw_limit.sign_us*10|round/10) us + verify \(.raw_limit.verify_us*10|round/10) us -> limit \(.raw_limit.limit_per_cpu_s|floor)/CPU-s  ratio \(.ratio_to_limit*1000|round/10) %  codes \(.status_codes|tostring)"' "$J"
    done
    if [ "${TRANSPORT:-0}" = 1 ]; then
        for MODE in tls plaintext; do
            for RUN in $(seq 1 "$RUNS"); do
                J="$WORK/health-$MODE-$KT-run$RUN.json"
                if [ "$MODE" = tls ]; then
                    TARGET=(--addr "$ADDR" --data-dir "$DATA")
                else
                    TARGET=(--addr "$PLAIN_ADDR" --plaintext)
                fi
                "$BIN" bench ca --rpc health "${TARGET[@]}" \
                    --concurrency "$CONCURRENCY" \
                    --connections "$CONNECTIONS" \
                    --duration "$DURATION" \
                    --warmup "$WARMUP" \
                    --server-pid "$SERVER_PID" \
                    --json >"$J"
                jq -r --arg run "$RUN" --arg mode "$MODE" '"health \($mode) run \($run): rps \(.rps|floor)  p50 \(.latency_ms.p50*100|round/100) ms  p99 \(.latency_ms.p99*100|round/100) ms  server CPU \(.server_cpu_s*100|round/100) s  client CPU \(.client_cpu_s*100|round/100) s  other CPU \(.other_cpu_s*100|round/100) s  OK/server-CPU-s \(.ok_per_server_cpu_s|floor)  codes \(.status_codes|tostring)"' "$J"
            done
            V=$(for J in "$WORK/health-$MODE-$KT"-run*.json; do jq -r '.ok_per_server_cpu_s' "$J"; done | median)
            echo "-- health $MODE: median OK per server CPU-second $V (server CPU per call $(awk -v v="$V" 'BEGIN { printf "%.1f", 1e6 / v }') us)"
        done
    fi
    stop_server

    echo "-- median of $RUNS runs (CA $KT, CSR $KT):"
    for F in rps latency_ms.p50 latency_ms.p90 latency_ms.p99 latency_ms.max server_cpu_s client_cpu_s other_cpu_s \
        ok_per_server_cpu_s raw_limit.sign_us raw_limit.verify_us raw_limit.limit_per_cpu_s ratio_to_limit; do
        V=$(for J in "$WORK/$KT"-run*.json; do jq -r ".$F" "$J"; done | median)
        printf '   %-28s %s\n' "$F" "$V"
    done
done
