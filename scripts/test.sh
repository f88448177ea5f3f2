#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs (fuse3, tmux, systemd-analyze,
# Garage, moto_server, pjdfstest, fsx),
# then format, lint, unit tests and end-to-end tests (real FUSE mounts, real S3 servers).
# Run as root (FUSE mounts, chown in test trees). Installs already done are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh: run as root (the end-to-end tests mount FUSE filesystems)" >&2
  exit 1
fi

if ! command -v fusermount3 >/dev/null; then
  log "installing fuse3"
  apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null
fi
[ -e /dev/fuse ] || { echo "no /dev/fuse on this machine" >&2; exit 1; }
# strata top runs in a real terminal (tmux); the systemd unit is checked by systemd-analyze; the
# daemon runs under setpriv with the unit's capabilities.
missing=""
command -v tmux >/dev/null || missing="$missing tmux"
command -v systemd-analyze >/dev/null || missing="$missing systemd"
command -v setpriv >/dev/null || missing="$missing util-linux"
command -v man >/dev/null || missing="$missing man-db"
if [ -n "$missing" ]; then
  log "installing$missing"
  apt-get update -qq && apt-get install -y -qq $missing >/dev/null
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! garage --version 2>/dev/null | grep -q '2\.5\.'; then
  log "installing garage 2.5 (cargo install, about 12 minutes)"
  cargo install garage --version '~2.5' --locked
fi

if ! python3 -c 'import moto.server' 2>/dev/null; then
  log "installing moto_server"
  python3 -m pip install -q 'moto[server]'
fi

# POSIX suites run against scratch mounts (tests/tests/suites.rs).
for suite in pjdfstest fsx; do
  if ! command -v "$suite" >/dev/null; then
    log "installing $suite (cargo install)"
    cargo install "$suite" --locked
  fi
done

log "format"
cargo fmt --all -- --check

log "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "layering"
# The crates that decode untrusted bytes stay synchronous and free of I/O runtimes.
for crate in strata-cache-format strata-fs-format; do
  if cargo tree -p "$crate" -e normal --locked | grep -q tokio; then
    echo "$crate must not depend on tokio" >&2; exit 1
  fi
done

log "build"
cargo build --workspace --bins --tests --examples --locked

log "tests"
# The end-to-end tests mount real filesystems and share one Garage per test binary.
RUST_BACKTRACE=1 cargo test --workspace --locked -- --test-threads="${STRATA_TEST_THREADS:-4}"
log "example: a program embedding the daemon"
# The build above made it with the workspace's features (`cargo run -p` would build it again).
"${CARGO_TARGET_DIR:-target}/debug/examples/embed"
log "all tests passed"
