#!/usr/bin/env bash
# A restart at a large fleet with the SQLite store: the release build in a
# temporary directory on loopback ports of its own. Registers EXECUTORS
# executors (through `loadtest throughput`, which registers its fleet and
# heartbeats it for 2 s), reads the server's RSS, kill -9s it, starts it
# again on the same data directory and reports
#   - kill -9 → serving: from the restart until the metrics show every
#     executor loaded (goal ≤ 3 s at 1M), and
#   - the RSS once the restarted server has settled (5 s) against the RSS
#     of the server that registered them (goal ≤ 1.1 ×).
# Exits non-zero when a goal is missed. Run it on a quiet machine.
#
#   scripts/restart-load.sh [EXECUTORS]      (default 1000000)
#
# RESTART_LOAD_PORT (default 10300) and RESTART_LOAD_METRICS_PORT (default
# 9500) move the server's ports.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000000}
port=${RESTART_LOAD_PORT:-10300}
metrics_port=${RESTART_LOAD_METRICS_PORT:-9500}
. scripts/load-common.sh
require_free_ports "set RESTART_LOAD_PORT / RESTART_LOAD_METRICS_PORT" "$port" "$metrics_port"

# Nothing expires during the run: registrations and loads get a 1 h TTL.
start_server() {
  "$bin/executor-registry" serve --data-dir "$dir/data" \
    --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics_port" \
    --max-executors 2000000 --init-heartbeat-ttl 1h --max-heartbeat-ttl 1h \
    >>"$dir/server.log" 2>&1 &
  server=$!
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$server/status"; }
loaded() {
  curl -s -m 1 "http://127.0.0.1:$metrics_port/metrics" 2>/dev/null |
    awk -F' ' '/^registry_executors\{/ { sum += $2 } END { print sum + 0 }'
}

start_server
wait_for_server "$port"
echo "registering $n executors…" >&2
"$bin/loadtest" throughput --endpoint "http://127.0.0.1:$port" --executors "$n" \
  --mode batch --duration 2s --ttl 1h >&2
sleep 2
registered_kib=$(rss_kib)
echo "registered: $(loaded) executors, server RSS $((registered_kib / 1024)) MiB" >&2

kill -9 "$server"
wait "$server" 2>/dev/null || true
started=$(date +%s%N)
start_server
until [ "$(loaded)" -ge "$n" ]; do
  kill -0 "$server" 2>/dev/null || { cat "$dir/server.log" >&2; exit 1; }
  sleep 0.02
done
serving_ms=$((($(date +%s%N) - started) / 1000000))
sleep 5
reloaded_kib=$(rss_kib)

ratio=$(awk -v a="$reloaded_kib" -v b="$registered_kib" 'BEGIN { printf "%.3f", a / b }')
echo "restart of $n executors (SQLite): kill -9 → serving ${serving_ms} ms (goal ≤ 3000);" \
  "RSS $((registered_kib / 1024)) MiB registered, $((reloaded_kib / 1024)) MiB reloaded = ${ratio} × (goal ≤ 1.1)"
failed=0
if [ "$serving_ms" -gt 3000 ]; then echo "goal missed: kill -9 → serving ≤ 3 s" >&2; failed=1; fi
if awk -v r="$ratio" 'BEGIN { exit !(r > 1.1) }'; then echo "goal missed: reload RSS ≤ 1.1 × registered" >&2; failed=1; fi
exit "$failed"
