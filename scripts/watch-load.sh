#!/usr/bin/env bash
# What watchers cost the registry at a large fleet: the release build in a
# temporary directory on loopback ports of its own, and `loadtest watchers`
# against it with the server's pid (its RSS is read from procfs every 50 ms).
# The scenario registers EXECUTORS executors, runs a steady heartbeat load on
# a sample of them, then:
#   A. 64 watchers take a snapshot at the same moment, read it to the end and
#      close: the server's RSS before, peak during, after (goals: peak ≤ 1.25 ×,
#      after ≤ 1.1 × before), heartbeat p99 and p99.9 quiet and during, the
#      time each watcher took, and whether each snapshot held exactly the
#      fleet, every id once;
#   B. one watcher stops reading for 10 s while EXPIRING executors expire
#      together, then reads on: it must get every OFFLINE event, revisions
#      consecutive, and never a new snapshot (if the server ends the stream,
#      it watches again from the last revision and counts resumes and
#      snapshots); the server's RSS before and at peak.
# Prints the summary; exits non-zero when a goal is missed (which one is
# printed). Run it on a quiet machine: client and server share its cores.
#
#   scripts/watch-load.sh [EXECUTORS] [EXPIRING] [LOADTEST FLAGS…]
#                                       (default 1000000 100000)
#
# e.g. scripts/watch-load.sh 50000 5000, or … --json for the JSON report.
# WATCH_LOAD_STORE=sqlite keeps the fleet in SQLite in the temporary
# directory (default: memory); WATCH_LOAD_PORT (default 10290) and
# WATCH_LOAD_METRICS_PORT (default 9490) move the server's ports.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000000}
expiring=${2:-100000}
shift $(( $# < 2 ? $# : 2 ))
store=${WATCH_LOAD_STORE:-memory}
port=${WATCH_LOAD_PORT:-10290}
metrics_port=${WATCH_LOAD_METRICS_PORT:-9490}
. scripts/load-common.sh
require_free_ports "set WATCH_LOAD_PORT / WATCH_LOAD_METRICS_PORT" "$port" "$metrics_port"
# The fleet's heartbeats ask for a 1 h TTL: longer than any run.
"$bin/executor-registry" serve --store "$store" --data-dir "$dir/data" \
  --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics_port" \
  --max-executors 2000000 --max-heartbeat-ttl 1h >"$dir/server.log" 2>&1 &
server=$!
wait_for_server "$port"
echo "server pid $server ($store store) on 127.0.0.1:$port; $n executors, $expiring expiring" >&2

status=0
"$bin/loadtest" watchers --endpoint "http://127.0.0.1:$port" \
  --metrics "http://127.0.0.1:$metrics_port/metrics" --server-pid "$server" \
  --executors "$n" --expiring "$expiring" --fleet-ttl 1h "$@" || status=$?
warnings=$(grep -c 'WARN' "$dir/server.log" || true)
if [ "$warnings" != 0 ]; then
  echo "server log: $warnings warnings, the last ones:" >&2
  grep 'WARN' "$dir/server.log" | tail -5 >&2
fi
kill -0 "$server" 2>/dev/null || { echo "the server exited during the run:" >&2; tail -20 "$dir/server.log" >&2; status=1; }
exit "$status"
