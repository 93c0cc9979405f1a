#!/usr/bin/env bash
# What replicas cost etcd in steady state: a real etcd (metrics on their own
# port), three replicas of the release build, and `loadtest fleet` with N
# executors heartbeating through a follower. Once every executor is
# registered and RUNNING, it samples etcd's own counters over a window and
# prints puts/s (etcd_mvcc_put_total), bytes/s received
# (etcd_network_client_grpc_received_bytes_total) and the fleet's heartbeat
# rate on the leader over the same window. Then a share of the fleet
# (KILL_FRACTION, default 0.01) stops heartbeating, and a second later the
# leader is killed (kill -9): it prints how long until another replica leads
# with every executor loaded and — from the fleet's own verifying watch, at
# the end of its run — how many executors that kept heartbeating went
# OFFLINE, whether every stopped one went OFFLINE within its TTL +
# 2 × lease + 2 × the suggested interval + the TTL granularity a new leader
# assumes (--watermark-interval, 5 s) after the new leader served, and
# whether the watch ever saw a revision go backwards.
#
#   scripts/etcd-load.sh [EXECUTORS] [WINDOW_SECONDS]     (default 100000 20)
#
# Needs etcd on the PATH (scripts/test.sh installs Debian's etcd-server).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100000}
window=${2:-20}
kill_fraction=${KILL_FRACTION:-0.01}
lease_s=5
granularity_s=5
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
    --advertise-address 127.0.0.1:1026$i --leader-lease "${lease_s}s" \
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
  --executors "$n" --mode batch --kill-fraction "$kill_fraction" --expiry-allowance 120s \
  --duration "$(( window * 3 + 60 ))s" --progress-every 10s --json >"$dir/fleet.json" 2>"$dir/fleet.log" &
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

# The fleet stops a share of its executors halfway through its run; a second
# later, kill -9 of the leader: how long until another one serves the whole
# fleet (every executor that kept heartbeating loaded).
until grep -q "stopping heartbeats" "$dir/fleet.log"; do
  kill -0 "$fleet" || { cat "$dir/fleet.log" >&2; exit 1; }
  sleep 0.2
done
echo "the fleet stopped heartbeating $kill_fraction of its executors; kill -9 of the leader in 1 s" >&2
sleep 1
killed=${pids[$leader]}
# Every executor that kept heartbeating (the stopped ones may be gone already).
kept=$(awk -v n="$n" -v f="$kill_fraction" 'BEGIN { printf "%d", n - int(n * f + 0.5) }')
kill -9 "$killed"
t0=$(date +%s.%N)
new=""
# 60 s, and 5 s more per 100,000 executors to load.
wait_s=$(( 60 + n / 20000 ))
deadline=$(( $(date +%s) + wait_s ))
while [ -z "$new" ]; do
  if [ "$(date +%s)" -gt "$deadline" ]; then
    echo "no replica led with $kept executors loaded within $wait_s s of the kill" >&2
    for i in 1 2 3; do
      [ "$i" = "$leader" ] && continue
      echo "replica $i: leader $(metric http://127.0.0.1:947$i registry_is_leader), running $(metric http://127.0.0.1:947$i 'registry_executors{status="running"}'), initing $(metric http://127.0.0.1:947$i 'registry_executors{status="initing"}')" >&2
    done
    tail -3 "$dir/fleet.log" >&2
    exit 1
  fi
  for i in 1 2 3; do
    [ "$i" = "$leader" ] && continue
    live=$(( $(metric http://127.0.0.1:947$i 'registry_executors{status="running"}') + $(metric http://127.0.0.1:947$i 'registry_executors{status="initing"}') ))
    if [ "$(metric http://127.0.0.1:947$i registry_is_leader)" = 1 ] && [ "$live" -ge "$kept" ]; then new=$i; fi
  done
  sleep 0.05
done
t1=$(date +%s.%N)
served_ms=$(awk -v t="$t1" 'BEGIN { printf "%.0f", t * 1000 }')
awk -v a="$t0" -v b="$t1" -v r="$new" -v l="$lease_s" 'BEGIN { printf "kill -9 of the leader: replica %d leads with every executor that kept heartbeating loaded after %.2f s (lease %d s)\n", r, b - a, l }'
grep -h '"leading"\|leading' "$dir/replica$new.log" | tail -1 >&2 || true
wait "$fleet" || true
python3 - "$dir/fleet.json" "$served_ms" "$lease_s" "$granularity_s" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
served_ms, lease_s, granularity_s = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
report = json.loads(text[text.index("{"):]) if "{" in text else {}
expiry = report.get("expiry", {})
beats = report.get("heartbeats", {})
watch = report.get("watch", {})
print("fleet after the failover: false expirations {}, passed {}{}".format(
    expiry.get("false_expirations"), report.get("passed"),
    "" if report.get("passed") else " ({})".format("; ".join(report.get("failures", [])))))
killed = expiry.get("killed", 0)
if killed:
    ttl_s = beats.get("max_ttl_ms", 0) / 1000
    interval_s = beats.get("interval_ms", 0) / 1000
    bound_s = ttl_s + 2 * lease_s + 2 * interval_s + granularity_s
    last_ms = expiry.get("last_killed_offline_unix_ms", 0)
    after_s = (last_ms - served_ms) / 1000
    ok = expiry.get("killed_not_offline") == 0 and expiry.get("killed_premature") == 0 \
        and after_s <= bound_s
    print("{} executors stopped {:.2f} s before the new leader served: OFFLINE {}, never {}, before their "
          "deadline {}; the last {:.2f} s after the new leader served (bound TTL {:.1f} + "
          "2 × lease {:.0f} + 2 × interval {:.1f} + granularity {:.0f} = {:.1f} s): {}".format(
              killed, (served_ms - expiry.get("kill_unix_ms", 0)) / 1000,
              expiry.get("killed_offline"), expiry.get("killed_not_offline"),
              expiry.get("killed_premature"), after_s, ttl_s, lease_s, interval_s,
              granularity_s, bound_s, "within" if ok else "NOT within"))
print("the watch: {} re-watches ({} resumed, {} new snapshots), revisions up to {}, "
      "went backwards {} times".format(
          watch.get("rewatches"), watch.get("resumes"), watch.get("resnapshots"),
          watch.get("highest_revision"), watch.get("backwards")))
PY
