#!/usr/bin/env bash
# The project's test command (README "Run the tests"; `.ci/run` calls it).
#
# Installs what the ignored tests need when it is missing — they are ignored
# in a bare `cargo test` because they need engines outside the crate — then
# runs every test, ignored ones included.
#
# Heavy release-mode tests are opt-in: REGISTRY_HEAVY_TESTS=1 scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*"; }

# Python gRPC tools: the cross-language client test generates a client from
# proto/registry/v1/registry.proto with them.
if ! python3 -c 'import grpc_tools, grpc_health, grpc_reflection' 2>/dev/null; then
  log "installing Python gRPC tools (grpcio-tools, grpcio-health-checking, grpcio-reflection)"
  python3 -m pip install --quiet --disable-pip-version-check \
    'grpcio==1.85.*' 'grpcio-tools==1.85.*' 'grpcio-health-checking==1.85.*' 'grpcio-reflection==1.85.*'
fi

# Debian packages of outside engines, installed together when missing:
# - prometheus (and promtool): tests/prometheus.rs checks the exposition, the
#   rules and the scrape config with promtool, and evaluates every dashboard
#   and alert expression in a Prometheus of its own;
# - etcd-server: tests/replicas.rs and tests/replicas_security.rs run three
#   replicas on an etcd of their own (plaintext, or TLS with client certificates).
# Each test starts its engine on free loopback ports with a temporary data
# directory. The packages' own services are not wanted: where no policy-rc.d
# already forbids them, one is put in place while this script runs.
cleanups=()
cleanup() { for c in "${cleanups[@]}"; do eval "$c"; done; }
trap cleanup EXIT
packages=()
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  packages+=(prometheus)
fi
if ! command -v etcd >/dev/null; then
  packages+=(etcd-server)
fi
if [ "${#packages[@]}" -gt 0 ]; then
  log "installing ${packages[*]} (Debian packages)"
  as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# scripts/test.sh: no service starts during this install\nexit 101\n' \
      | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
    cleanups+=("as_root rm -f '$policy'")  # removed when this script ends
  fi
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${packages[@]}"
fi

# A real full filesystem for the store's disk-full test: a 512 KiB tmpfs
# (needs root, as CI is). Where it cannot be mounted, that one test is
# skipped and said so.
skip=(--skip sqlite_commit_rate) # a measurement, run by hand (see its doc)
full_fs=$(mktemp -d)
cleanups+=("umount '$full_fs' 2>/dev/null || true; rmdir '$full_fs' 2>/dev/null || true")
if mount -t tmpfs -o size=512k tmpfs "$full_fs" 2>/dev/null; then
  export REGISTRY_FULL_FS="$full_fs"
else
  log "cannot mount a tmpfs (not root?): skipping the disk-full test"
  skip+=(--skip disk_full)
fi

log "cargo test (ignored tests included)"
cargo test --workspace --locked -- --include-ignored "${skip[@]}"

# Model checking of the heartbeat/expiry/deregister protocol on the state
# word: every interleaving, with loom's atomics (a build of its own).
log "loom model checking (cfg registry_loom)"
RUSTFLAGS="--cfg registry_loom" CARGO_TARGET_DIR=target/loom \
  cargo test --locked --lib loom_
