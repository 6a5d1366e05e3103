#!/usr/bin/env bash
# Soak: DURATION seconds (default 600) of CSR traffic plus xDS churn against one release meshd:
#   - `meshd bench ca` signing continuously (ECDSA P-256, 2 callers);
#   - 200 ADS streams held for the whole run (half Delta), ACKing every push;
#   - batches of 100 streams that connect, hold 20 s and disconnect, back to back;
#   - an EndpointSlice in the --config-dir rewritten every second (endpoint-only pushes).
# Every INTERVAL seconds (default 30) it prints meshd's RSS, open fds, live tokio tasks, connected
# streams, certificates issued and pushes sent, read from /metrics. Flat RSS/fds/tasks is the goal.
#
#   bash benches/soak.sh                 # 10 minutes
#   DURATION=120 INTERVAL=10 bash benches/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-600}
INTERVAL=${INTERVAL:-30}
BIN=${MESHD_BIN:-target/release/meshd}
if [ -z "${MESHD_BIN:-}" ]; then
    cargo build --release --bin meshd
fi

T=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT

mkdir -p "$T/config"
cp examples/config-dir/*.yaml "$T/config/"
churn() { # $1: generation → a Service + EndpointSlice with 3 endpoints that move every call
    local g=$1 a=$(( $1 % 250 + 1 ))
    cat >"$T/churn.tmp" <<EOF
apiVersion: v1
kind: Service
metadata: {name: churn, namespace: default}
spec:
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: churn-1
  namespace: default
  labels: {kubernetes.io/service-name: churn}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - addresses: ["10.99.$a.1"]
  - addresses: ["10.99.$a.2"]
  - addresses: ["10.99.$(( (g / 250) % 250 + 1 )).3"]
EOF
    mv "$T/churn.tmp" "$T/config/churn.yaml"
}
churn 0

"$BIN" serve --standalone --data-dir "$T/data" --config-dir "$T/config" --config-dir-poll 250ms \
    --ca-key-type ecdsa-p256 --max-requests-per-second 0 \
    --grpc-addr 127.0.0.1:0 --plaintext-addr 127.0.0.1:0 --monitoring-addr 127.0.0.1:0 \
    --ready-addr 127.0.0.1:0 --webhook-addr 127.0.0.1:0 --log-format text --log-level warn,meshd=info \
    2>"$T/meshd.log" &
MESHD=$!
PIDS+=("$MESHD")
addr() { sed -n "s/.*listening listener=$1 addr=\([0-9.:]*\).*/\1/p" "$T/meshd.log" | head -1; }
for _ in $(seq 100); do
    [ -n "$(addr ready)" ] && curl -fs "http://$(addr ready)/ready" >/dev/null 2>&1 && break
    sleep 0.2
done
GRPC=$(addr grpc-tls); PLAIN=$(addr grpc-plaintext); MON=$(addr monitoring)
[ -n "$MON" ] || { echo "meshd did not start:"; cat "$T/meshd.log"; exit 1; }
echo "soak: meshd pid $MESHD grpc=$GRPC xds=$PLAIN monitoring=$MON; ${DURATION}s, sample every ${INTERVAL}s"

END=$(( $(date +%s) + DURATION ))
"$BIN" bench ca --addr "$GRPC" --data-dir "$T/data" --key-type ecdsa-p256 --concurrency 2 \
    --warmup 0s --duration "${DURATION}s" >"$T/ca.out" 2>&1 &
PIDS+=("$!")
"$BIN" bench xds --addr "$PLAIN" --streams 200 --hold "${DURATION}s" --timeout 120s >"$T/held.out" 2>&1 &
PIDS+=("$!")
( while [ "$(date +%s)" -lt "$END" ]; do
      "$BIN" bench xds --addr "$PLAIN" --streams 100 --hold 20s --timeout 60s >>"$T/churn-streams.out" 2>&1 || echo "batch failed" >>"$T/churn-streams.out"
  done ) &
PIDS+=("$!")
( g=0; while [ "$(date +%s)" -lt "$END" ]; do g=$((g + 1)); churn "$g"; sleep 1; done ) &
PIDS+=("$!")

metric() { # sum of every series of a metric family
    awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $NF } END { printf "%.0f", s }' "$T/metrics"
}
printf '%6s %10s %6s %7s %7s %9s %9s\n' t_s rss_mib fds tasks streams certs pushes | tee "$T/samples"
START=$(date +%s)
while :; do
    now=$(date +%s)
    curl -fs "http://$MON/metrics" >"$T/metrics" || { echo "meshd stopped answering"; tail -50 "$T/meshd.log"; exit 1; }
    printf '%6d %10.1f %6d %7d %7d %9d %9d\n' $(( now - START )) \
        "$(awk -v b="$(metric process_resident_memory_bytes)" 'BEGIN{print b/1048576}')" \
        "$(metric process_open_fds)" "$(metric meshd_tokio_alive_tasks)" "$(metric pilot_xds)" \
        "$(metric citadel_server_success_cert_issuance_count)" "$(metric pilot_xds_pushes)" | tee -a "$T/samples"
    [ "$now" -ge "$END" ] && break
    sleep "$INTERVAL"
done

kill -0 "$MESHD" || { echo "meshd died"; exit 1; }
echo "--- CA load:"; grep -E 'rate|p50|p99|errors' "$T/ca.out" | head -8 || true
echo "--- stream batches: $(grep -c 'ready' "$T/churn-streams.out" || true) completed, $(grep -c 'batch failed' "$T/churn-streams.out" || true) failed"
# Flatness: the last sample against the one after the first minute (warm caches, all load on).
awk 'NR == 1 { next } { t[NR] = $1; r[NR] = $2; f[NR] = $3; k[NR] = $4; n = NR }
     END { b = 2; for (i = 2; i <= n; i++) if (t[i] >= 60) { b = i; break }
           printf "--- after warm-up (t=%ss) → end (t=%ss): rss %.1f → %.1f MiB (%.2fx), fds %d → %d, tasks %d → %d\n",
                  t[b], t[n], r[b], r[n], r[n] / r[b], f[b], f[n], k[b], k[n] }' "$T/samples"
