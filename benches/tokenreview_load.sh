#!/usr/bin/env bash
# CreateCertificate throughput with Kubernetes TokenReview against the fake API server, review
# cache on vs off, with the number of TokenReview API calls: see BENCHMARKS.md.
#
# What it does:
#   1. builds target/release/meshd and target/release/examples/fake_apiserver (`--features
#      testing`) unless NO_BUILD=1 (cargo does nothing when they are fresh);
#   2. starts the fake API server for cluster "cluster2" on $FAKE_ADDR (127.0.0.3:0), state dir in
#      a temp dir, and reads its url and admin token from there;
#   3. through the fake server's control API (/fake/...): gets a reader token (Istio's reader
#      RBAC, as a remote secret carries), writes the kubeconfig for it as file `cluster2` in a
#      temp --remote-kubeconfig-dir, and mints one gateway service-account token
#      (istio-system/istio-ingressgateway-service-account, bound to a pod, audience istio-ca);
#   4. per variant, starts `meshd serve --standalone --remote-kubeconfig-dir DIR --ca-key-type
#      ecdsa-p256` on a fresh data dir, every port on 127.0.0.1:0 (ports parsed from the
#      `listening listener=... addr=...` lines), and waits until /debug/clusterz shows cluster2
#      synced without error; both servers run side by side (the idle one only holds its watches);
#   5. runs `meshd bench ca --token FILE --cluster-id cluster2` RUNS times per variant,
#      interleaved (on, off, on, off, …) so the shared machine's noise falls on both alike,
#      reading around each run the fake server's TokenReview counter (/fake/counters), meshd's
#      CSR counter and TokenReview/cache metrics (/metrics), and the fake server's CPU time
#      (/proc), and prints the median of each figure per variant:
#        cache-on   --token-review-cache-ttl 60s (meshd's default)
#        cache-off  --token-review-cache-ttl 0s: every CSR needs a review, but identical
#                   reviews in flight at the same moment still share one API call (coalescing
#                   cannot be turned off), so with one token and many concurrent callers the
#                   API-call count is well below one per CSR.
#
# "TokenReview calls per 1,000 CSRs" divides the fake server's TokenReview count by meshd's
# citadel_server_csr_count over the same span (the whole `meshd bench ca` process: first call,
# warm-up and measured window), so both sides count the same requests.
#
# Everything listens on loopback only; every process this script starts is killed on exit.
#
# Environment knobs (defaults in brackets):
#   VARIANTS ["on off"]  CONCURRENCY [50]  CONNECTIONS [1]  DURATION [15s]  WARMUP [2s]  RUNS [3]
#   CACHE_TTL_ON [60s]  FAKE_ADDR [127.0.0.3:0]  NO_BUILD [unset; 1 reuses the built binaries]
#   QUIET_BUSY [0.3] QUIET_WAIT [90]: before each run, wait up to QUIET_WAIT seconds for the
#             machine to be less than QUIET_BUSY busy (fraction of all cores) over one second
#             (QUIET_WAIT=0: no check); each run's other_cpu_s (CPU used by everything but meshd
#             and the load client, the fake API server included) tells how busy it was
#   OUT [unset; directory where every run's JSON, counters and the logs are kept]
#   BIN [target/release/meshd]  FAKE_BIN [target/release/examples/fake_apiserver]
set -euo pipefail

cd "$(dirname "$0")/.."

VARIANTS=${VARIANTS:-"on off"}
CONCURRENCY=${CONCURRENCY:-50}
CONNECTIONS=${CONNECTIONS:-1}
DURATION=${DURATION:-15s}
WARMUP=${WARMUP:-2s}
RUNS=${RUNS:-3}
CACHE_TTL_ON=${CACHE_TTL_ON:-60s}
QUIET_BUSY=${QUIET_BUSY:-0.3}
QUIET_WAIT=${QUIET_WAIT:-90}
FAKE_ADDR=${FAKE_ADDR:-127.0.0.3:0}
CLUSTER=cluster2
KEY_TYPE=ecdsa-p256

for tool in jq curl; do
    command -v "$tool" >/dev/null || { echo "tokenreview_load.sh: $tool is required" >&2; exit 1; }
done

if [ "${NO_BUILD:-0}" != 1 ]; then
    cargo build --release --bin meshd
    cargo build --release --features testing --example fake_apiserver
fi
BIN=${BIN:-target/release/meshd}
FAKE_BIN=${FAKE_BIN:-target/release/examples/fake_apiserver}
for b in "$BIN" "$FAKE_BIN"; do
    [ -x "$b" ] || { echo "tokenreview_load.sh: $b is missing" >&2; exit 1; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/meshd-tokenreview-load.XXXXXX")
FAKE_PID=""
SERVER_PIDS=()

stop_pid() {
    local pid=$1
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
}

stop_servers() {
    local pid
    for pid in "${SERVER_PIDS[@]}"; do
        stop_pid "$pid"
    done
    SERVER_PIDS=()
}

cleanup() {
    stop_servers
    stop_pid "$FAKE_PID"
    FAKE_PID=""
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT"
        cp "$WORK"/*.json "$WORK"/*.log "$WORK"/*.tsv "$OUT"/ 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() {
    echo "tokenreview_load.sh: $*" >&2
    exit 1
}

# Median of the numbers on stdin (one per line); "null" when there are none.
median() {
    grep -v '^null$' | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "null"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

CLK_TCK=$(getconf CLK_TCK)
# utime + stime of a process in seconds (fields 14 and 15 of /proc/PID/stat, after the comm).
cpu_seconds() {
    awk -v hz="$CLK_TCK" '{ sub(/^.*\) /, ""); printf "%.2f\n", ($12 + $13) / hz }' "/proc/$1/stat"
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "load: --concurrency $CONCURRENCY --connections $CONNECTIONS --duration $DURATION --warmup $WARMUP, $RUNS runs per variant, CSR $KEY_TYPE, CA $KEY_TYPE"

# --- the fake API server for cluster2 ---
STATE="$WORK/$CLUSTER-state"
FAKE_LOG="$WORK/fake-apiserver.log"
"$FAKE_BIN" --bind "$FAKE_ADDR" --cluster-name "$CLUSTER" --state-dir "$STATE" 2>"$FAKE_LOG" &
FAKE_PID=$!
DEADLINE=$((SECONDS + 30))
until [ -s "$STATE/url" ] && [ -s "$STATE/admin-token" ] && [ -s "$STATE/ca.pem" ]; do
    kill -0 "$FAKE_PID" 2>/dev/null || { cat "$FAKE_LOG" >&2; die "the fake API server exited"; }
    [ "$SECONDS" -lt "$DEADLINE" ] || { cat "$FAKE_LOG" >&2; die "the fake API server wrote no state after 30s"; }
    sleep 0.1
done
FAKE_URL=$(cat "$STATE/url")
ADMIN_TOKEN=$(cat "$STATE/admin-token")

# The control API: admin bearer token, TLS verified against the fake server's own CA.
fake() {
    local method=$1 path=$2
    shift 2
    curl -sS --fail-with-body --cacert "$STATE/ca.pem" -H "Authorization: Bearer $ADMIN_TOKEN" \
        -X "$method" "$@" "$FAKE_URL/fake$path"
}
fake_reviews() {
    fake GET /counters | jq -r '.tokenReviews.total'
}

fake GET /healthz >/dev/null
READER_TOKEN=$(fake POST "/reader-token?serviceAccount=istio-reader-service-account" | jq -er '.token')
KCDIR="$WORK/remote-kubeconfigs"
mkdir -p "$KCDIR"
# Written under a dotted name and renamed, so meshd's directory poll never reads half a file.
fake GET /kubeconfig -G --data-urlencode "token=$READER_TOKEN" >"$KCDIR/.$CLUSTER.tmp"
mv "$KCDIR/.$CLUSTER.tmp" "$KCDIR/$CLUSTER"

TOKEN_FILE="$WORK/gateway.jwt"
fake POST /token -H 'content-type: application/json' --data-binary @- <<'EOF' | jq -er '.token' >"$TOKEN_FILE"
{"namespace": "istio-system", "serviceAccount": "istio-ingressgateway-service-account",
 "audiences": ["istio-ca"], "ttlSeconds": 3600,
 "pod": {"name": "istio-ingressgateway-7d4f9c8b6-x2x9q", "uid": "5f0c6a52-0b3d-4f61-9a59-2d0c4b4e9a10"}}
EOF
echo "fake API server: pid $FAKE_PID, $FAKE_URL (cluster $CLUSTER); gateway token istio-system/istio-ingressgateway-service-account, audience istio-ca, 1h"

# One metric sample from meshd's /metrics text on stdin: name with its exact label set, 0 if absent.
metric() {
    awk -v want="$1" '$1 == want { v = $2 } END { print (v == "" ? 0 : v) }'
}

# Counters around a run, space separated: reviews (fake server) csrs api_calls hits misses
# coalesced review_seconds_sum review_count (meshd) fake_cpu_s.
snapshot() {
    local mon=$1 m out
    m=$(curl -sS --fail "http://$mon/metrics") || die "reading meshd's /metrics"
    out=$(printf '%s %s %s %s %s %s %s %s %s\n' \
        "$(fake_reviews)" \
        "$(metric citadel_server_csr_count <<<"$m")" \
        "$(metric "meshd_token_review_api_calls{cluster=\"$CLUSTER\",result=\"authenticated\"}" <<<"$m")" \
        "$(metric "meshd_auth_review_cache_hits{kind=\"tokenreview\",authority=\"$CLUSTER\"}" <<<"$m")" \
        "$(metric "meshd_auth_review_cache_misses{kind=\"tokenreview\",authority=\"$CLUSTER\"}" <<<"$m")" \
        "$(metric "meshd_auth_review_cache_coalesced{kind=\"tokenreview\",authority=\"$CLUSTER\"}" <<<"$m")" \
        "$(metric "meshd_token_review_duration_seconds_sum{cluster=\"$CLUSTER\"}" <<<"$m")" \
        "$(metric "meshd_token_review_duration_seconds_count{cluster=\"$CLUSTER\"}" <<<"$m")" \
        "$(cpu_seconds "$FAKE_PID")")
    [[ "$out" =~ ^[0-9]+\ [0-9]+\ [0-9]+\ [0-9]+\ [0-9]+\ [0-9]+\ [0-9.e+-]+\ [0-9]+\ [0-9.]+$ ]] ||
        die "unexpected counters: $out"
    echo "$out"
}

# --- one meshd per variant, all started up front; runs are interleaved (on, off, on, off, …) so
# that noise from the shared machine falls on both variants alike ---
declare -A PID_OF ADDR_OF MON_OF DATA_OF TTL_OF
for V in $VARIANTS; do
    case "$V" in
        on) TTL_OF[$V]=$CACHE_TTL_ON ;;
        off) TTL_OF[$V]=0s ;;
        *) die "unknown variant $V (on, off)" ;;
    esac
    DATA_OF[$V]="$WORK/data-$V"
    LOG="$WORK/meshd-cache-$V.log"
    "$BIN" serve \
        --standalone \
        --remote-kubeconfig-dir "$KCDIR" \
        --ca-key-type "$KEY_TYPE" \
        --token-review-cache-ttl "${TTL_OF[$V]}" \
        --data-dir "${DATA_OF[$V]}" \
        --grpc-addr 127.0.0.1:0 \
        --plaintext-addr 127.0.0.1:0 \
        --monitoring-addr 127.0.0.1:0 \
        --ready-addr 127.0.0.1:0 \
        --webhook-addr 127.0.0.1:0 \
        --log-format text \
        2>"$LOG" &
    PID_OF[$V]=$!
    SERVER_PIDS+=("${PID_OF[$V]}")

    ADDR=""
    MON=""
    DEADLINE=$((SECONDS + 30))
    while :; do
        ADDR=$(sed -n 's/.*listener=grpc-tls addr=\([0-9.]*:[0-9]*\).*/\1/p' "$LOG" | head -n1)
        MON=$(sed -n 's/.*listener=monitoring addr=\([0-9.]*:[0-9]*\).*/\1/p' "$LOG" | head -n1)
        [ -n "$ADDR" ] && [ -n "$MON" ] && break
        kill -0 "${PID_OF[$V]}" 2>/dev/null || { cat "$LOG" >&2; die "meshd serve (cache $V) exited"; }
        [ "$SECONDS" -lt "$DEADLINE" ] || { cat "$LOG" >&2; die "no grpc-tls/monitoring listener after 30s"; }
        sleep 0.1
    done
    ADDR_OF[$V]=$ADDR
    MON_OF[$V]=$MON

    # Registered, reachable (synced) and without error in /debug/clusterz (loopback only).
    DEADLINE=$((SECONDS + 60))
    until curl -sS --fail "http://$MON/debug/clusterz" 2>/dev/null |
        jq -e --arg id "$CLUSTER" 'any(.[]; .id == $id and .synced == true and .error == null)' >/dev/null; do
        kill -0 "${PID_OF[$V]}" 2>/dev/null || { cat "$LOG" >&2; die "meshd serve (cache $V) exited"; }
        if [ "$SECONDS" -ge "$DEADLINE" ]; then
            curl -sS "http://$MON/debug/clusterz" >&2 || true
            cat "$LOG" >&2
            die "cluster $CLUSTER not synced in /debug/clusterz after 60s"
        fi
        sleep 0.2
    done
    echo "meshd cache $V (--token-review-cache-ttl ${TTL_OF[$V]}): pid ${PID_OF[$V]}, grpc-tls $ADDR, monitoring $MON, $CLUSTER synced"
done

# Busy fraction of the whole machine over one second, from /proc/stat (iowait counts as idle).
machine_busy() {
    local a b
    a=$(awk '/^cpu / { print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9 }' /proc/stat)
    sleep 1
    b=$(awk '/^cpu / { print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9 }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); d = y[2] - x[2]; printf "%.2f\n", (d > 0 ? (y[1] - x[1]) / d : 0) }'
}

# Waits (at most QUIET_WAIT seconds) until the machine is below QUIET_BUSY busy for a second.
wait_quiet() {
    local deadline=$((SECONDS + QUIET_WAIT)) busy
    [ "$QUIET_WAIT" -gt 0 ] || return 0
    while :; do
        busy=$(machine_busy)
        awk -v b="$busy" -v m="$QUIET_BUSY" 'BEGIN { exit !(b < m) }' && return 0
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "   note: machine still ${busy} busy after ${QUIET_WAIT}s of waiting; running anyway"
            return 0
        fi
        sleep 2
    done
}

for RUN in $(seq 1 "$RUNS"); do
    for V in $VARIANTS; do
        J="$WORK/cache-$V-run$RUN.json"
        MON=${MON_OF[$V]}
        wait_quiet
        S0=$(snapshot "$MON")
        read -r R0 C0 A0 H0 M0 K0 D0 N0 F0 <<<"$S0"
        "$BIN" bench ca \
            --addr "${ADDR_OF[$V]}" \
            --root-cert "${DATA_OF[$V]}/root-cert.pem" \
            --token "$TOKEN_FILE" \
            --cluster-id "$CLUSTER" \
            --key-type "$KEY_TYPE" \
            --concurrency "$CONCURRENCY" \
            --connections "$CONNECTIONS" \
            --duration "$DURATION" \
            --warmup "$WARMUP" \
            --server-pid "${PID_OF[$V]}" \
            --json >"$J"
        S1=$(snapshot "$MON")
        read -r R1 C1 A1 H1 M1 K1 D1 N1 F1 <<<"$S1"
        # Merge the counters into the run's JSON so OUT keeps everything in one place.
        jq --argjson reviews $((R1 - R0)) --argjson csrs $((C1 - C0)) --argjson api $((A1 - A0)) \
            --argjson hits $((H1 - H0)) --argjson misses $((M1 - M0)) --argjson coalesced $((K1 - K0)) \
            --argjson fake_cpu "$(awk -v a="$F0" -v b="$F1" 'BEGIN { printf "%.2f", b - a }')" \
            --argjson review_ms "$(awk -v s0="$D0" -v s1="$D1" -v n0="$N0" -v n1="$N1" 'BEGIN { if (n1 > n0) printf "%.3f", (s1 - s0) * 1000 / (n1 - n0); else print "null" }')" \
            '. + { tokenreview: {
                fake_apiserver_reviews: $reviews, meshd_csrs: $csrs, meshd_api_calls: $api,
                cache_hits: $hits, cache_misses: $misses, cache_coalesced: $coalesced,
                fake_apiserver_cpu_s: $fake_cpu, review_mean_ms: $review_ms,
                reviews_per_1000_csrs: (if $csrs > 0 then $reviews * 1000 / $csrs else null end) } }' \
            "$J" >"$J.tmp" && mv "$J.tmp" "$J"
        jq -r --arg run "$RUN" --arg v "$V" '"cache \($v) run \($run): rps \(.rps|floor)  p50 \(.latency_ms.p50*100|round/100) ms  p99 \(.latency_ms.p99*100|round/100) ms  OK/server-CPU-s \(.ok_per_server_cpu_s|floor)  server CPU \(.server_cpu_s*100|round/100) s  client CPU \(.client_cpu_s*100|round/100) s  other CPU \(.other_cpu_s*100|round/100) s  | CSRs \(.tokenreview.meshd_csrs)  TokenReviews \(.tokenreview.fake_apiserver_reviews) (meshd counted \(.tokenreview.meshd_api_calls); cache hits \(.tokenreview.cache_hits) misses \(.tokenreview.cache_misses) coalesced \(.tokenreview.cache_coalesced))  per 1000 CSRs \(.tokenreview.reviews_per_1000_csrs*100|round/100)  review RTT \(.tokenreview.review_mean_ms) ms  fake-apiserver CPU \(.tokenreview.fake_apiserver_cpu_s) s  codes \(.status_codes|tostring)"' "$J"
        if [ "$((R1 - R0))" != "$((A1 - A0))" ]; then
            echo "   note: the fake API server counted $((R1 - R0)) TokenReviews, meshd $((A1 - A0)) authenticated API calls"
        fi
    done
done
stop_servers

# One row per variant: medians of the runs.
for V in $VARIANTS; do
    printf '%s\t%s' "$V" "${TTL_OF[$V]}"
    for F in .rps .latency_ms.p50 .latency_ms.p99 .ok_per_server_cpu_s .server_cpu_s .client_cpu_s .other_cpu_s \
        .tokenreview.fake_apiserver_cpu_s .tokenreview.reviews_per_1000_csrs .tokenreview.fake_apiserver_reviews \
        .tokenreview.meshd_csrs .tokenreview.review_mean_ms; do
        printf '\t%s' "$(for J in "$WORK/cache-$V"-run*.json; do jq -r "$F" "$J"; done | median)"
    done
    printf '\n'
done >"$WORK/summary.tsv"

echo
echo "median of $RUNS runs per variant (CSRs and TokenReviews span the whole bench process: first call, warm-up, measured window):"
{
    printf 'cache\tttl\trps\tp50_ms\tp99_ms\tOK/server-CPU-s\tserver_CPU_s\tclient_CPU_s\tother_CPU_s\tfake_apiserver_CPU_s\tTokenReviews/1000_CSRs\tTokenReviews\tCSRs\treview_RTT_ms\n'
    awk -F'\t' '{ printf "%s\t%s\t%.0f\t%.2f\t%.2f\t%.0f\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%s\t%s\t%s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14 }' "$WORK/summary.tsv"
} | column -t -s $'\t'
