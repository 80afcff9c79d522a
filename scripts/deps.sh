#!/usr/bin/env bash
# Makes sure this machine has what Tether's cluster and test suite need, installing what is
# missing through apt (Debian/Ubuntu) and saying so. Fails — never skips — when something
# cannot be had.
#
#   scripts/deps.sh            check and install: cargo, redis-server, nats-server, python3, openssl, haproxy, node + npm, cargo-nextest
set -euo pipefail

say() { printf 'deps: %s\n' "$*" >&2; }
die() { printf 'deps: error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@";
  elif command -v sudo >/dev/null 2>&1; then sudo "$@";
  else die "need root (or sudo) to run: $*"; fi
}

apt_updated=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "$1 is missing and this is not a Debian/Ubuntu machine (no apt-get): install $1 yourself"
  if [ "$apt_updated" -eq 0 ]; then
    say "running apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
    apt_updated=1
  fi
  say "installing $* through apt"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2 || die "apt-get install $* failed"
}

command -v cargo >/dev/null 2>&1 || die "cargo is missing: install Rust (stable) from your distribution or rustup"

if ! command -v redis-server >/dev/null 2>&1; then
  say "redis-server not found"
  apt_install redis-server
  # The Debian package starts a system Redis on 6379; Tether's tools and tests start their
  # own on free ports and never use it.
fi
command -v redis-server >/dev/null 2>&1 || die "redis-server still missing after install"
say "redis-server: $(redis-server --version | head -n1)"

if ! command -v nats-server >/dev/null 2>&1; then
  say "nats-server not found"
  apt_install nats-server
  # As with Redis: the tools and tests start their own nats-server on free ports.
fi
command -v nats-server >/dev/null 2>&1 || die "nats-server still missing after install"
say "nats-server: $(nats-server --version | head -n1)"

# scripts/check-cycles.sh (the structure check in test.sh) reads the source tree with Python.
if ! command -v python3 >/dev/null 2>&1; then
  say "python3 not found"
  apt_install python3
fi
command -v python3 >/dev/null 2>&1 || die "python3 still missing after install"

# The JWT tests and benchmark generate their RS256/ES256 test keys with openssl.
if ! command -v openssl >/dev/null 2>&1; then
  say "openssl not found"
  apt_install openssl
fi
command -v openssl >/dev/null 2>&1 || die "openssl still missing after install"

# `tether bench proxies --tls` and its smoke test measure HAProxy terminating TLS (Debian puts
# it in /usr/sbin, which a non-root PATH may lack).
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
  say "haproxy not found"
  apt_install haproxy
fi
{ command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; } || die "haproxy still missing after install"

# `tether bench fanout --steady --vs socketio` (and its smoke test) runs Socket.IO on Node.js;
# the bench installs Socket.IO's pinned packages itself (npm ci into target/socketio).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  say "node or npm not found"
  apt_install nodejs npm
fi
command -v node >/dev/null 2>&1 || die "node still missing after install"
command -v npm >/dev/null 2>&1 || die "npm still missing after install"
say "node: $(node --version), npm: $(npm --version)"

if ! cargo nextest --version >/dev/null 2>&1; then
  say "cargo-nextest not found; installing it with cargo (a few minutes, once)"
  cargo install --locked cargo-nextest >&2 || die "cargo install cargo-nextest failed"
fi
say "cargo-nextest: $(cargo nextest --version 2>/dev/null | head -n1)"
