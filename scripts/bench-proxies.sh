#!/usr/bin/env bash
# tether-balancer against HAProxy and nginx (and a direct connection as the floor) on the same
# WebSocket echo workloads; see docs/PERFORMANCE.md.
#
#   scripts/bench-proxies.sh            # the default run (~5 minutes), a markdown table at the end
#   scripts/bench-proxies.sh --quick    # smoke run, < 20 s after the build
#   scripts/bench-proxies.sh --json out.json --rounds 5   # any `tether bench proxies` flag
#   scripts/bench-proxies.sh --tls --json tls.json        # every proxy terminates TLS (wss clients)
#
# Builds the binaries in release, installs haproxy and nginx from Debian packages when they are
# missing (apt-get update once, then apt-get install -y), then runs `tether bench proxies`,
# which starts two echo backends, the three proxies with one thread each, and measures.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing ${missing[*]} (apt-get)" >&2
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    else
        echo "== ${missing[*]} missing and cannot be installed here (needs root and apt-get); those targets are skipped" >&2
    fi
fi

echo "== cargo build --release --bins" >&2
cargo build --release --locked -p tether -p tether-node -p tether-balancer --bins

export TETHER_BIN_DIR="$PWD/target/release"
echo "== tether bench proxies $*" >&2
exec target/release/tether bench proxies --no-install "$@"
