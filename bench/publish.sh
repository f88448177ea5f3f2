#!/usr/bin/env bash
# Publish and cold-read figures against Garage on loopback (issue #2's note):
#  - publish throughput of a 1 GiB directory (one 512 MiB file + 512 files of 1 MiB);
#  - bytes uploaded by re-publishing it unchanged, and after a 1% edit;
#  - time to mount a cold 200 MiB layer and cat one small file, with the store's GET count;
#  - sequential read of a 512 MiB file through the mount, cold and warm (a first look; the
#    full read benchmark against native disk, rclone and s3fs is issue #3's).
# Builds release, starts its own Garage, prints a markdown table and saves it in bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib/garage.sh
[ "$(id -u)" = 0 ] || { echo "run as root (FUSE mount, loopback route settings)" >&2; exit 1; }

cargo build --release -p strata --locked
strata=${CARGO_TARGET_DIR:-$PWD/target}/release/strata
work=$(mktemp -d /tmp/strata-bench.XXXXXX)
cleanup() {
  grep -qs " $work/mnt " /proc/mounts && "$strata" unmount --lazy "$work/mnt" || true
  quickack_off; garage_stop; rm -rf "$work"
}
trap cleanup EXIT
garage_start "$work/garage"
quickack_on
store=s3://bench
now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

echo "== making 1 GiB of data"
mkdir -p "$work/big/files"
head -c $((512 << 20)) /dev/urandom > "$work/big/model.bin"
for i in $(seq 1 512); do head -c $((1 << 20)) /dev/urandom > "$work/big/files/$i.bin"; done
sync

echo "== publish 1 GiB"
t0=$(now); "$strata" publish --json "$work/big" $store big:v1 > "$work/p1.json"; t1=$(now)
pub_secs=$(secs "$t0" "$t1")
pub_rate=$(echo "1024 / $pub_secs" | bc -l)
echo "== re-publish unchanged"
"$strata" publish --json "$work/big" $store big:v2 > "$work/p2.json"
echo "== 1% edit (10 MiB rewritten in the middle of model.bin) and publish"
dd if=/dev/urandom of="$work/big/model.bin" bs=1M count=10 seek=200 conv=notrunc status=none
"$strata" publish --json "$work/big" $store big:v3 > "$work/p3.json"

echo "== cold 200 MiB layer: mount + cat one small file"
mkdir -p "$work/l/parts"
for i in $(seq 1 20); do head -c $((10 << 20)) /dev/urandom > "$work/l/parts/$i.bin"; done
echo "the small file" > "$work/l/small.txt"
"$strata" publish --json "$work/l" $store layer200:v1 > "$work/p4.json"
mkdir -p "$work/mnt"
g0=$(garage_get_count)
t0=$(now)
"$strata" mount $store "$work/mnt" --layer layer200:v1 --foreground --cache-dir "$work/cache" 2> "$work/mount.log" &
mount_pid=$!
until grep -qs " $work/mnt " /proc/mounts; do sleep 0.005; done
t1=$(now)
cat "$work/mnt/small.txt" > /dev/null
t2=$(now)
g1=$(garage_get_count)
"$strata" unmount "$work/mnt"; wait "$mount_pid"

echo "== sequential read of the 512 MiB file: cold (empty cache), then warm (chunks on disk, page cache dropped)"
seq_read() {
  "$strata" mount $store "$work/mnt" --layer big:v3 --foreground --cache-dir "$work/cache-big" 2>> "$work/mount.log" &
  local pid=$!
  until grep -qs " $work/mnt " /proc/mounts; do sleep 0.005; done
  local a b
  a=$(now); cat "$work/mnt/model.bin" > /dev/null; b=$(now)
  "$strata" unmount "$work/mnt"; wait "$pid"
  echo "512 / ($b - $a)" | bc -l
}
cold_rate=$(seq_read)
sync; echo 3 > /proc/sys/vm/drop_caches
warm_rate=$(seq_read)

row() { printf '| %s | %s |\n' "$1" "$2"; }
out=bench/results/publish-$(date +%Y%m%d-%H%M%S).md
{
  echo "# strata publish / cold read — $(date -u +%F) on $(nproc) cores, $(uname -r), Garage $(garage --version | awk '{print $2}') on loopback (quick ACKs on)"
  echo
  echo "| measure | value |"
  echo "|---|---|"
  row "publish 1 GiB (1 × 512 MiB + 512 × 1 MiB), wall" "$(printf '%.2f s' "$pub_secs")"
  row "publish throughput" "$(printf '%.0f MiB/s' "$pub_rate")"
  row "chunks (total / new) first publish" "$(json "['chunks_total']" < "$work/p1.json") / $(json "['chunks_new']" < "$work/p1.json")"
  row "re-publish unchanged: bytes uploaded" "$(json "['bytes_uploaded']" < "$work/p2.json")"
  row "1% edit: chunks new / total" "$(json "['chunks_new']" < "$work/p3.json") / $(json "['chunks_total']" < "$work/p3.json")"
  row "1% edit: bytes uploaded" "$(json "['bytes_uploaded']" < "$work/p3.json") ($(python3 -c "import json; d=json.load(open('$work/p3.json')); print('%.2f%%' % (100*d['bytes_uploaded']/d['bytes']))") of the tree)"
  row "cold 200 MiB layer: mount until visible" "$(printf '%.0f ms' "$(echo "($t1 - $t0) * 1000" | bc -l)")"
  row "then cat one small file" "$(printf '%.1f ms' "$(echo "($t2 - $t1) * 1000" | bc -l)")"
  row "GETs for mount + cat (of $(json "['chunks_total']" < "$work/p4.json") chunks)" "$((g1 - g0))"
  row "sequential read 512 MiB, cold (from Garage)" "$(printf '%.0f MiB/s' "$cold_rate")"
  row "sequential read 512 MiB, warm (disk cache, page cache dropped)" "$(printf '%.0f MiB/s' "$warm_rate")"
} | tee "$out"
echo "saved $out"
