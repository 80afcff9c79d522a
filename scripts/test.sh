#!/usr/bin/env bash
# The whole test suite, from a fresh clone: dependencies, formatting, lints, binaries, tests.
#
#   scripts/test.sh [extra nextest args]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== structure: no sibling import cycles, no file over 800 lines, no main.rs over 80" >&2
scripts/check-cycles.sh
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
# End-to-end tests start real tether-node / tether-balancer / tether processes: build them first.
echo "== cargo build --bins" >&2
cargo build --workspace --bins --locked
echo "== cargo nextest run" >&2
cargo nextest run --workspace --locked --no-fail-fast "$@"
