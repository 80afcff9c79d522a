#!/usr/bin/env bash
# Starts a local Tether cluster from a fresh clone: its own redis-server on a free port,
# three nodes and the balancer (ws://127.0.0.1:8080/ws). Ctrl-C stops it all.
#
#   scripts/up.sh [tether up flags, e.g. --nodes 5 --redis redis://host:6379/]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
cargo build --release --bins --locked
exec target/release/tether up "$@"
