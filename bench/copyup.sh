#!/usr/bin/env bash
# Read latency while writers copy up (issue #11): one process reads 4 KiB at random offsets of
# a cached layer file (O_DIRECT, so every read reaches strata), alone and then while 8 other
# processes each write one byte into every 256 KiB block of their own 256 MiB layer file in
# random order, each write copying a block up from the layers, mostly from chunks not cached
# yet (fetched from Garage on loopback); the reads count while the writers run. Prints
# p50/p99/max read latency per phase.
#
#   sudo bench/copyup.sh                         # the strata built from this tree
#   sudo BEFORE=/path/to/old/strata bench/copyup.sh   # and an older build, side by side
#
# Every figure is one run of BENCH_SECONDS (default 20: the reader alone, and the most the
# writers get) per phase; compare the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib/garage.sh
source bench/lib/measure.sh
source bench/lib/daemon.sh
[ "$(id -u)" = 0 ] || { echo "run as root (FUSE mounts, dropping caches, loopback routes)" >&2; exit 1; }
command -v fusermount3 >/dev/null || apt-get install -y -qq fuse3 >/dev/null
command -v garage >/dev/null || cargo install garage --locked --version '^2.5'

cargo build --release -p strata --locked
after=${CARGO_TARGET_DIR:-$PWD/target}/release/strata
seconds=${BENCH_SECONDS:-20}
work=$(mktemp -d /tmp/strata-copyup.XXXXXX)
bench_init "$work"
cleanup() {
  set +e
  bench_cleanup
  quickack_off; garage_stop; rm -rf "$work"
}
trap cleanup EXIT
garage_start "$work/garage"
quickack_on
store=s3://bench

echo "== making and publishing the data (8 × 256 MiB, and a 512 KiB file to read)"
mkdir -p "$work/data"
for i in $(seq 0 7); do head -c $((256 << 20)) /dev/urandom > "$work/data/w$i"; done
head -c $((512 << 10)) /dev/urandom > "$work/data/hot"
"$after" publish "$work/data" $store copyup:v1 > /dev/null

# One binary's run: a fresh daemon with an empty cache, a scratch mount, the hot file's
# chunks cached, then the two phases. Prints "label phase reads p50 p99 max writes" lines.
# It runs in a pipeline's subshell: the daemon's pid is recorded for the cleanup all the same.
measure() {
  local label=$1 strata=$2
  export STRATA_SOCKET=$work/$label.sock
  DAEMON_BIN=$strata DAEMON_CACHE=$work/cache-$label DAEMON_STATE=$work/state-$label
  DAEMON_LOG=$work/daemon-$label.log
  daemon_start
  mkdir -p "$work/m-$label"
  "$strata" mount $store "$work/m-$label" --layer copyup:v1 > /dev/null
  cat "$work/m-$label/hot" > /dev/null
  drop_caches
  python3 bench/lib/copyup_load.py "$work/m-$label/hot" "$seconds" \
    $(for i in $(seq 0 7); do echo "$work/m-$label/w$i"; done) | sed "s/^/$label /"
  "$strata" unmount "$work/m-$label"
  daemon_stop
}

results=$work/results
: > "$results"
[ -n "${BEFORE:-}" ] && measure before "$BEFORE" | tee -a "$results"
measure after "$after" | tee -a "$results"

out=bench/results/copyup-$(date +%Y%m%d-%H%M%S).md
{
  echo "# Read latency while 8 writers copy up ($(date -u +%F), $(nproc) cores, ${seconds}s per phase)"
  echo
  echo "| build | phase | reads | p50 µs | p99 µs | max µs | blocks copied up | seconds |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|"
  while read -r label phase reads p50 p99 mx writes secs; do
    echo "| $label | $phase | $reads | $p50 | $p99 | $mx | $writes | $secs |"
  done < "$results"
} | tee "$out"
