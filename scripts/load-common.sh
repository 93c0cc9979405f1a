# Shared by the load scripts that start a release server of their own
# (sourced, not run; from the repository's root): builds the server and the
# load test, makes a temporary directory `$dir` that is removed on exit, and
# stops the server whose pid is in `$server` then.
bin=${CARGO_TARGET_DIR:-target}/release
cargo build --release --locked -p executor-registry --bin executor-registry >&2
cargo build --release --locked -p loadtest --bin loadtest >&2
dir=$(mktemp -d)
server=""
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT

# require_free_ports HINT PORT…: exits naming the first port taken on
# 127.0.0.1, and HINT (which variables move it).
require_free_ports() {
  local hint=$1 p
  shift
  for p in "$@"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "port $p is taken on 127.0.0.1 ($hint)" >&2
      exit 1
    fi
  done
}

# wait_for_server PORT: until the server `$server` answers on PORT (10 s);
# exits with its log ($dir/server.log) if it died meanwhile.
wait_for_server() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
    kill -0 "$server" 2>/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    sleep 0.1
  done
}
