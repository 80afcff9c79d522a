#!/usr/bin/env bash
# Two (or more) builds side by side on the same benchmark, interleaved, so that the noise of a
# shared machine falls on every build alike; see docs/PERFORMANCE.md.
#
#   scripts/bench-ab.sh ROUNDS DIR_A DIR_B [DIR_C ...] -- BENCH ARGS...
#   scripts/bench-ab.sh 3 /tmp/old /tmp/new -- fanout --rates 3200 --step-secs 3 --hop-rate 0
#
# Each DIR holds a build's `tether`, `tether-node` and `tether-balancer` (copy them out of
# target/release/ after building each commit); `tether bench` starts the servers found next to
# the `tether` it runs. Each round runs `DIR/tether bench BENCH ARGS...` once per DIR, in the
# order given, and prints the lines that carry figures, under a header naming the build, the
# round and the load average.
set -euo pipefail

usage() { sed -n '5,6p' "$0" | sed 's/^# *//' >&2; exit 64; }
[ $# -ge 4 ] || usage
rounds=$1
shift
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a positive number, not '$rounds'" >&2; exit 64; }
dirs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    [ -x "$1/tether" ] || { echo "$1/tether: not an executable (build, then copy target/release/tether* there)" >&2; exit 66; }
    dirs+=("$1")
    shift
done
[ $# -gt 1 ] && [ ${#dirs[@]} -ge 1 ] || usage
shift

for round in $(seq 1 "$rounds"); do
    for dir in "${dirs[@]}"; do
        echo "== $dir round $round/$rounds, load average $(cut -d' ' -f1-3 /proc/loadavg)"
        "$dir/tether" bench "$@" 2>&1 | grep -E 'rate .*delivered|hop at|without a backbone|node memory|best|KiB per|echoes' || true
    done
done
