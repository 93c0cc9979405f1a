#!/usr/bin/env bash
# What replicas cost etcd in steady state: a real etcd (metrics on their own
# port), three replicas of the release build, and `loadtest fleet` with N
# executors heartbeating through a follower. Once every executor is
# registered and RUNNING, it samples etcd's own counters over a window and
# prints puts/s (etcd_mvcc_put_total), bytes/s received
# (etcd_network_client_grpc_received_bytes_total) and the fleet's heartbeat
# rate on the leader over the same window. Then it kills the leader
# (kill -9) and prints how long until another replica leads with every
# executor loaded, and — from the fleet's own verifying watch, at the end of
# its run — how many executors that kept heartbeating went OFFLINE.
#
#   scripts/etcd-load.sh [EXECUTORS] [WINDOW_SECONDS]     (default 100000 20)
#
# Needs etcd on the PATH (scripts/test.sh installs Debian's etcd-server).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100000}
window=${2:-20}
cargo build --release --locked -p executor-registry --bin executor-registry >&2
cargo build --release --locked -p loadtest --bin loadtest >&2
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

etcd --data-dir "$dir/etcd" --listen-client-urls http://127.0.0.1:23790 \
  --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800 \
  --listen-metrics-urls http://127.0.0.1:23791 --log-level error >"$dir/etcd.log" 2>&1 &
pids+=($!)
sleep 2
for i in 1 2 3; do
  target/release/executor-registry serve --store etcd://127.0.0.1:23790 \
    --listen 127.0.0.1:1026$i --metrics-listen 127.0.0.1:947$i \
    --advertise-address 127.0.0.1:1026$i --leader-lease 5s \
    --max-executors 2000000 >"$dir/replica$i.log" 2>&1 &
  pids+=($!)
done
metric() { # url series
  curl -s "$1/metrics" | awk -v s="$2" '$1 == s { v += $2 } END { printf "%.0f\n", v }'
}
leader=""
for _ in $(seq 100); do
  for i in 1 2 3; do
    if [ "$(metric http://127.0.0.1:947$i registry_is_leader)" = 1 ]; then leader=$i; fi
  done
  [ -n "$leader" ] && break
  sleep 0.2
done
[ -n "$leader" ] || { echo "no leader elected" >&2; exit 1; }
follower=$(( leader % 3 + 1 ))
echo "leader: replica $leader; the fleet goes through replica $follower" >&2

target/release/loadtest fleet --endpoint "http://127.0.0.1:1026$follower" \
  --executors "$n" --mode batch --kill-fraction 0 --duration "$(( window * 3 + 60 ))s" \
  --progress-every 10s --json >"$dir/fleet.json" 2>"$dir/fleet.log" &
fleet=$!
pids+=($fleet)
leader_metrics=http://127.0.0.1:947$leader
until [ "$(metric "$leader_metrics" 'registry_executors{status="running"}')" -ge "$n" ]; do
  kill -0 "$fleet" || { cat "$dir/fleet.log" >&2; exit 1; }
  sleep 1
done
echo "all $n RUNNING; settling 10 s" >&2
sleep 10
etcd_metrics=http://127.0.0.1:23791
p0=$(metric $etcd_metrics etcd_mvcc_put_total)
b0=$(metric $etcd_metrics etcd_network_client_grpc_received_bytes_total)
h0=$(metric "$leader_metrics" 'registry_heartbeats_total{result="ok"}')
sleep "$window"
p1=$(metric $etcd_metrics etcd_mvcc_put_total)
b1=$(metric $etcd_metrics etcd_network_client_grpc_received_bytes_total)
h1=$(metric "$leader_metrics" 'registry_heartbeats_total{result="ok"}')
awk -v n="$n" -v w="$window" -v p=$((p1 - p0)) -v b=$((b1 - b0)) -v h=$((h1 - h0)) 'BEGIN {
  printf "executors %d, window %d s: etcd %.1f puts/s, %.1f KB/s received; heartbeats %.0f/s through the leader\n",
    n, w, p / w, b / w / 1000, h / w
}'

# kill -9 of the leader: how long until another one serves the whole fleet.
killed=${pids[$leader]}
kill -9 "$killed"
t0=$(date +%s.%N)
new=""
while [ -z "$new" ]; do
  for i in 1 2 3; do
    [ "$i" = "$leader" ] && continue
    live=$(( $(metric http://127.0.0.1:947$i 'registry_executors{status="running"}') + $(metric http://127.0.0.1:947$i 'registry_executors{status="initing"}') ))
    if [ "$(metric http://127.0.0.1:947$i registry_is_leader)" = 1 ] && [ "$live" -ge "$n" ]; then new=$i; fi
  done
  sleep 0.05
done
t1=$(date +%s.%N)
awk -v a="$t0" -v b="$t1" -v r="$new" 'BEGIN { printf "kill -9 of the leader: replica %d leads with every executor loaded after %.2f s (lease 5 s)\n", r, b - a }'
grep -h '"leading"\|leading' "$dir/replica$new.log" | tail -1 >&2 || true
wait "$fleet" || true
python3 - "$dir/fleet.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
report = json.loads(text[text.index("{"):]) if "{" in text else {}
expiry = report.get("expiry", {})
print("fleet after the failover: false expirations {}, passed {}".format(
    expiry.get("false_expirations"), report.get("passed")))
PY
