#!/usr/bin/env bash
# Restart soak: the example executor (examples/executor.rs, built on
# client::Membership) must stay RUNNING while its registry is restarted every
# INTERVAL seconds for DURATION seconds.
#
# Builds release, starts `executor-registry serve` on a free port with a temp
# --data-dir and the default store (or STORE), starts the example executor
# with --id-file, then repeatedly: SIGTERM the server, start it again on the
# same port and data dir, and within GRACE seconds `ctl get <id> --json` must
# say RUNNING; between restarts it must stay RUNNING (checked every CHECK_EVERY
# seconds). At the end the executor gets SIGTERM and must deregister.
#
# Environment (all optional):
#   DURATION=600        soak length in seconds (10 minutes)
#   INTERVAL=30         seconds between restarts
#   GRACE=5             seconds a restart may take to be RUNNING again
#   CHECK_EVERY=5       seconds between checks while the server is up
#   STORE=              `serve --store` (empty: serve's default)
#   REQUIRE_SAME_ID=1   fail if the executor's id changes: with a durable
#                       store a restart must not lose it (0: only count it,
#                       for a store that forgets; the default with
#                       STORE=memory)
#   KEEP=0              1: keep the temp dir with the logs
#
# Exit status 0 when every check passed, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-600}
INTERVAL=${INTERVAL:-30}
GRACE=${GRACE:-5}
CHECK_EVERY=${CHECK_EVERY:-5}
STORE=${STORE:-}
if [[ $STORE == memory ]]; then REQUIRE_SAME_ID=${REQUIRE_SAME_ID:-0}; fi
REQUIRE_SAME_ID=${REQUIRE_SAME_ID:-1}
KEEP=${KEEP:-0}

log() { printf '%s soak: %s\n' "$(date +%H:%M:%S)" "$*"; }

log "building release (executor-registry, examples/executor)"
cargo build --release --quiet --bin executor-registry --example executor
target=${CARGO_TARGET_DIR:-target}
BIN=$target/release/executor-registry
EXAMPLE=$target/release/examples/executor

work=$(mktemp -d)
server_pid=""
executor_pid=""
cleanup() {
  [[ -n $executor_pid ]] && kill "$executor_pid" 2>/dev/null || true
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  if [[ $KEEP == 1 ]]; then log "logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port=$(free_port)
metrics_port=$(free_port)
endpoint="http://127.0.0.1:$port"
ctl() { "$BIN" ctl --endpoint "$endpoint" --timeout 2s "$@"; }

start_server() {
  local store_args=()
  [[ -n $STORE ]] && store_args=(--store "$STORE")
  "$BIN" serve --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics_port" \
    --data-dir "$work/data" "${store_args[@]}" >>"$work/serve.log" 2>&1 &
  server_pid=$!
  local deadline=$((SECONDS + 20))
  until ctl count >/dev/null 2>&1; do
    if ((SECONDS > deadline)) || ! kill -0 "$server_pid" 2>/dev/null; then
      log "FAIL: the server did not come up; tail of serve.log:"
      tail -n 20 "$work/serve.log"
      exit 1
    fi
    sleep 0.05
  done
}

stop_server() {
  kill -TERM "$server_pid"
  local rc=0
  wait "$server_pid" || rc=$?
  server_pid=""
  if ((rc != 0)); then
    log "FAIL: the server exited $rc on SIGTERM"
    failures=$((failures + 1))
  fi
}

current_id() { tr -d '[:space:]' <"$work/id" 2>/dev/null || true; }

# Sets `status` to the executor's current status ("running", "initing", or
# "absent") and `last_id` to the id it asked about.
probe() {
  last_id=$(current_id)
  local out
  if out=$(ctl get "$last_id" --json 2>/dev/null); then
    status=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])' <<<"$out")
  else
    status=absent
  fi
}

failures=0
checks=0
restarts=0
id_changes=0
worst_ms=0
prev_id=""
status=""
last_id=""

note_id() {
  local id=$1
  if [[ $id != "$prev_id" ]]; then
    if [[ -n $prev_id ]]; then
      id_changes=$((id_changes + 1))
      log "id changed: $prev_id -> $id"
      if [[ $REQUIRE_SAME_ID == 1 ]]; then
        log "FAIL: the executor's id changed across a restart (REQUIRE_SAME_ID=1)"
        failures=$((failures + 1))
      fi
    fi
    prev_id=$id
  fi
}

# Waits up to GRACE seconds for RUNNING; records how long it took.
expect_running_within_grace() {
  local started_ns
  started_ns=$(date +%s%N)
  local deadline_ns=$((started_ns + GRACE * 1000000000))
  while :; do
    probe
    if [[ $status == running ]]; then
      local took_ms=$((($(date +%s%N) - started_ns) / 1000000))
      ((took_ms > worst_ms)) && worst_ms=$took_ms
      checks=$((checks + 1))
      note_id "$last_id"
      log "restart $restarts: $last_id RUNNING after ${took_ms} ms"
      return
    fi
    if (($(date +%s%N) > deadline_ns)); then
      checks=$((checks + 1))
      failures=$((failures + 1))
      log "FAIL: restart $restarts: ${last_id:-<no id>} is '$status', not RUNNING, ${GRACE}s after the restart"
      return
    fi
    sleep 0.1
  done
}

expect_running_now() {
  probe
  checks=$((checks + 1))
  if [[ $status != running ]]; then
    failures=$((failures + 1))
    log "FAIL: ${last_id:-<no id>} is '$status' between restarts"
  else
    note_id "$last_id"
  fi
  if ! kill -0 "$executor_pid" 2>/dev/null; then
    log "FAIL: the example executor died; tail of its log:"
    tail -n 20 "$work/executor.log"
    exit 1
  fi
}

log "registry on $endpoint, data dir $work/data, store ${STORE:-<serve default>}"
log "soak: ${DURATION}s, a restart every ${INTERVAL}s, ${GRACE}s grace"
start_server
RUST_LOG=${RUST_LOG:-info} "$EXAMPLE" --endpoint "$endpoint" --name soak \
  --address 127.0.0.1:9000 --label soak=yes --id-file "$work/id" \
  >"$work/executor.log" 2>&1 &
executor_pid=$!
deadline=$((SECONDS + 20))
until [[ -s $work/id ]]; do
  ((SECONDS < deadline)) || { log "FAIL: the executor never joined"; tail -n 20 "$work/executor.log"; exit 1; }
  sleep 0.05
done
restarts=0
expect_running_within_grace
first_id=$last_id

soak_end=$((SECONDS + DURATION))
next_restart=$((SECONDS + INTERVAL))
check_until() {
  local until=$1
  while ((SECONDS + CHECK_EVERY < until)); do
    sleep "$CHECK_EVERY"
    expect_running_now
  done
  local rest=$((until - SECONDS))
  ((rest > 0)) && sleep "$rest"
  return 0
}
while ((next_restart <= soak_end)); do
  check_until "$next_restart"
  stop_server
  start_server
  restarts=$((restarts + 1))
  expect_running_within_grace
  next_restart=$((next_restart + INTERVAL))
done
check_until "$soak_end"
expect_running_now

log "stopping the executor (SIGTERM): it must deregister"
final_id=$(current_id)
kill -TERM "$executor_pid"
rc=0
wait "$executor_pid" || rc=$?
executor_pid=""
if ((rc != 0)); then
  log "FAIL: the executor exited $rc"
  failures=$((failures + 1))
fi
get_rc=0
ctl get "$final_id" >/dev/null 2>&1 || get_rc=$?
if ((get_rc != 3)); then
  log "FAIL: after shutdown, ctl get $final_id exited $get_rc (expected 3: deregistered)"
  failures=$((failures + 1))
fi
stop_server

echo
echo "== restart soak summary =="
echo "duration:             ${DURATION}s, restart every ${INTERVAL}s"
echo "store:                ${STORE:-<serve default>}"
echo "restarts:             $restarts"
echo "RUNNING checks:       $checks"
echo "failures:             $failures"
echo "first id / last id:   $first_id / $final_id"
echo "id changes:           $id_changes (REQUIRE_SAME_ID=$REQUIRE_SAME_ID)"
echo "slowest back to RUNNING after a restart: ${worst_ms} ms (grace ${GRACE}s)"
lost=$(grep -c 'lost: the registry no longer holds' "$work/executor.log" || true)
echo "Lost notifications:   $lost"
if ((failures > 0)); then
  echo "RESULT: FAIL"
  KEEP=1
  exit 1
fi
echo "RESULT: PASS"
