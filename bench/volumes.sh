#!/usr/bin/env bash
# The volume and `strata run` benchmark (issue #5), on one Garage on loopback:
#   - what a commit costs: 1,000 new small files; one changed MiB in a 1 GiB layer file (its
#     chunks cached, and on a host with a cold cache); a moved 1 GiB layer file;
#   - mount time of a volume with 50 commits, before and after a squash (a host with the
#     manifests cached, and a new host);
#   - 16 concurrent `strata run` invocations of a 1 GiB dataset against one alone.
# Prints a markdown table and saves it in bench/results/.
#
#   sudo bench/volumes.sh        # about 3 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib/garage.sh
source bench/lib/measure.sh
source bench/lib/daemon.sh
[ "$(id -u)" = 0 ] || { echo "run as root (FUSE mounts, namespaces, dropping caches)" >&2; exit 1; }
command -v garage >/dev/null || cargo install garage --locked --version '^2.5'
command -v bc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y bc >/dev/null

cargo build --release -p strata --locked
strata=${CARGO_TARGET_DIR:-$PWD/target}/release/strata
work=$(mktemp -d /tmp/strata-volbench.XXXXXX)
export STRATA_SOCKET=$work/daemon.sock STRATA_SINGLE_WRITER=1
bench_init "$work"
# daemon_cold (bench/lib/daemon.sh) is a new host: an empty cache, the page cache dropped.
DAEMON_BIN=$strata DAEMON_STATE=$work/state DAEMON_COLD_DROP_CACHES=1

cleanup() {
  set +e
  bench_cleanup
  quickack_off; garage_stop; rm -rf "$work"
}
trap cleanup EXIT
garage_start "$work/garage"
quickack_on
store=s3://bench

kib() { echo "$1 / 1024" | bc; }

total() { "$strata" stats --json | python3 -c "import json,sys; print(json.load(sys.stdin)['total']['$1'])"; }
vmount() { mkdir -p "$2"; "$strata" mount $store "$2" --volume "$1" "${@:3}" > /dev/null; }
last_upload() { "$strata" volume show $store "$1" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['commits'][-1]['bytes_uploaded'])"; }

echo "== making and publishing the data"
data=$work/data
mkdir -p "$data/big" "$data/small" "$data/small2"
head -c $((1 << 30)) /dev/urandom > "$data/big/model.bin"
for i in $(seq 1 1000); do
  head -c 4096 /dev/urandom > "$data/small/f$i.txt"
  head -c 4096 /dev/urandom > "$data/small2/f$i.txt"   # other bytes, for the publish baseline
done
daemon_cold
"$strata" publish "$data/big" $store big:v1 > /dev/null

echo "== commit: 1,000 new 4 KiB files"
vmount bench/small "$work/m/small"
cp -r "$data/small/." "$work/m/small/"
small_commit=$(timed "$strata" unmount "$work/m/small")
small_up=$(last_upload bench/small)
small_publish=$(timed "$strata" publish "$data/small2" $store small:v1)

echo "== commit: one changed MiB in the 1 GiB layer file, its chunks cached"
vmount bench/one-mib "$work/m/mib" --layer big:v1
cat "$work/m/mib/model.bin" > /dev/null
dd if=/dev/urandom of="$work/m/mib/model.bin" bs=1M count=1 seek=512 conv=notrunc,fsync status=none
before=$(total store_bytes)
mib_warm=$(timed "$strata" unmount "$work/m/mib")
mib_warm_fetched=$(( $(total store_bytes) - before ))
mib_warm_up=$(last_upload bench/one-mib)

echo "== commit: one changed MiB in the 1 GiB layer file, on a host with a cold cache"
daemon_cold
vmount bench/one-mib-cold "$work/m/mibc" --layer big:v1
dd if=/dev/urandom of="$work/m/mibc/model.bin" bs=1M count=1 seek=512 conv=notrunc,fsync status=none
before=$(total store_bytes)
mib_cold=$(timed "$strata" unmount "$work/m/mibc")
mib_cold_fetched=$(( $(total store_bytes) - before ))
mib_cold_up=$(last_upload bench/one-mib-cold)

echo "== commit: the 1 GiB layer file moved, on a host with a cold cache"
daemon_cold
vmount bench/moved "$work/m/moved" --layer big:v1
mkdir "$work/m/moved/archive"; mv "$work/m/moved/model.bin" "$work/m/moved/archive/"
before=$(total store_bytes)
moved=$(timed "$strata" unmount "$work/m/moved")
moved_fetched=$(( $(total store_bytes) - before ))
moved_up=$(last_upload bench/moved)

echo "== fsync on a volume with 10,000 changed files, against ext4"
fsync_probe() { # dir → "first_ms steady_ms": 10,000 new files, one fsync, then 200 × (4 KiB append + fsync)
  python3 - "$1" <<'PY'
import os, sys, time
d = sys.argv[1]
for i in range(10000):
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(b"x" * 100)
fd = os.open(os.path.join(d, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
t = time.monotonic(); os.fsync(fd); first = time.monotonic() - t
t = time.monotonic()
for _ in range(200):
    os.write(fd, b"y" * 4096); os.fsync(fd)
print("%.1f %.3f" % (first * 1e3, (time.monotonic() - t) / 200 * 1e3))
PY
}
vmount bench/fsync "$work/m/fsync"
read -r vol_first_ms vol_fsync_ms <<< "$(fsync_probe "$work/m/fsync")"
"$strata" unmount "$work/m/fsync"
mkdir -p "$work/native-fsync"; sync
read -r nat_first_ms nat_fsync_ms <<< "$(fsync_probe "$work/native-fsync")"
rm -rf "$work/native-fsync"

echo "== a volume with 50 commits"
daemon_cold --squash-after 0
for i in $(seq 1 50); do
  vmount bench/long "$work/m/long"
  head -c 4096 /dev/urandom > "$work/m/long/f$i"
  echo "commit $i" >> "$work/m/long/log"
  "$strata" unmount "$work/m/long"
done
mount_times() { # sets mt_warm (median of 3 mounts, manifests cached), mt_cold (a new host), mt_find
  local warm=() t
  for _ in 1 2 3; do
    t=$(timed vmount bench/long "$work/m/long"); warm+=("$t")
    "$strata" unmount "$work/m/long"
  done
  mt_warm=$(median "${warm[@]}")
  daemon_cold --squash-after 0
  mt_cold=$(timed vmount bench/long "$work/m/long")
  mt_find=$(timed find "$work/m/long" -type f -exec stat {} +)
  "$strata" unmount "$work/m/long"
}
mount_times; long_warm=$mt_warm long_cold=$mt_cold long_find=$mt_find
long_commits=$("$strata" volume show $store bench/long --json | python3 -c "import json,sys; print(len(json.load(sys.stdin)['commits']))")
squash_s=$(timed "$strata" volume squash $store bench/long)
mount_times; sq_warm=$mt_warm sq_cold=$mt_cold sq_find=$mt_find
# The same data as one plain layer, for scale.
vmount bench/long "$work/m/long"; plain_files=$(find "$work/m/long" -type f | wc -l); "$strata" unmount "$work/m/long"

echo "== strata run: 1 alone, then 16 at once, of the 1 GiB dataset (cold cache each time)"
one_run() { "$strata" run $store --dataset big:v1 -- cat model.bin > /dev/null; }
daemon_cold
before_gets=$(garage_get_count)
run1=$(timed one_run)
run1_gets=$(( $(garage_get_count) - before_gets ))
daemon_cold
before_gets=$(garage_get_count)
sixteen() { for _ in $(seq 1 16); do one_run & done; wait; }
run16=$(timed sixteen)
run16_gets=$(( $(garage_get_count) - before_gets ))
run16_store=$(total store_bytes)
run16_chunks=$(total chunks_fetched)
left_mounts=$("$strata" mounts | grep -vc "no mounts" || true)
left_scratch=$( { find "$work/state/scratch" -mindepth 1 -maxdepth 1 2>/dev/null || true; } | wc -l)
daemon_stop

rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
out=bench/results/volumes-$(date -u +%Y%m%d-%H%M%S).md
{
  echo "# strata volume and run benchmark — $(date -u '+%F %H:%M') UTC, strata $rev"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB RAM, kernel $(uname -r). Store: Garage $(garage --version | awk '{print $2}') on loopback, sharing the cores. One run each."
  echo
  echo "| measure | figure | for scale |"
  echo "|---|---|---|"
  echo "| commit of 1,000 new 4 KiB files: time (s) / uploaded (KiB) | $(fmt "$small_commit") / $(kib "$small_up") | \`strata publish\` of 1,000 other 4 KiB files: $(fmt "$small_publish") s |"
  echo "| commit of one changed MiB in a 1 GiB layer file, chunks cached: time (s) / uploaded (KiB) / fetched (MiB) | $(fmt "$mib_warm") / $(kib "$mib_warm_up") / $(( mib_warm_fetched >> 20 )) | |"
  echo "| the same on a host with a cold cache: time (s) / uploaded (KiB) / fetched (MiB) | $(fmt "$mib_cold") / $(kib "$mib_cold_up") / $(( mib_cold_fetched >> 20 )) | |"
  echo "| commit of the 1 GiB layer file moved, cold cache: time (s) / uploaded (KiB) / fetched (MiB) | $(fmt "$moved") / $(kib "$moved_up") / $(( moved_fetched >> 20 )) | |"
  echo "| fsync on a volume with 10,000 changed files: the first (syncs them all) / then per 4 KiB append + fsync (ms) | $(fmt "$vol_first_ms" 0) / $(fmt "$vol_fsync_ms") | ext4: $(fmt "$nat_first_ms" 0) / $(fmt "$nat_fsync_ms"); $(fmt "$(ratio "$vol_fsync_ms" "$nat_fsync_ms")")× |"
  echo "| mount of a volume with $long_commits commits: manifests cached / new host (s) | $(fmt "$long_warm" 3) / $(fmt "$long_cold" 3) | |"
  echo "| stat of its $plain_files files, new host (s) | $(fmt "$long_find" 3) | |"
  echo "| squash of those $long_commits commits (s) | $(fmt "$squash_s" 3) | |"
  echo "| mount after the squash: manifests cached / new host (s) | $(fmt "$sq_warm" 3) / $(fmt "$sq_cold" 3) | $(fmt "$(ratio "$sq_cold" "$long_cold")")× the new-host mount before |"
  echo "| stat of its files after the squash, new host (s) | $(fmt "$sq_find" 3) | $(fmt "$(ratio "$sq_find" "$long_find")")× before |"
  echo "| \`strata run … cat\` of the 1 GiB dataset, cold: one alone (s) | $(fmt "$run1") | |"
  echo "| 16 such runs at once, cold: wall (s) | $(fmt "$run16") | $(fmt "$(ratio "$run16" "$run1")")× one run |"
  echo "| 16 runs: store GETs / chunks fetched / bytes fetched | $run16_gets / $run16_chunks / $(fmt "$(ratio "$run16_store" $((1 << 30)))")× the file | one run: $run1_gets GETs |"
  echo "| left behind after the 16 runs: mounts / scratch dirs | $left_mounts / $left_scratch | |"
} | tee "$out"
echo "saved $out"
