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

log "cargo test (ignored tests included)"
cargo test --locked -- --include-ignored
