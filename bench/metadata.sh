#!/usr/bin/env bash
# Metadata scale: publish a layer of N empty files (default 1,000,000 in 1,000 directories) to
# a file:// store, then time a cold mount until it is visible, a stat deep inside it and a full
# `find | wc -l`, and report the serving process's memory (anonymous vs file-backed RSS: the
# manifest is memory-mapped, so its pages are page cache, not heap).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (FUSE mount)" >&2; exit 1; }
n=${1:-1000000}
cargo build --release -p strata --locked
strata=${CARGO_TARGET_DIR:-$PWD/target}/release/strata
work=$(mktemp -d /tmp/strata-meta.XXXXXX)
trap 'grep -qs " $work/mnt " /proc/mounts && "$strata" unmount --lazy "$work/mnt"; rm -rf "$work"' EXIT
now() { date +%s.%N; }
ms() { printf '%.0f ms' "$(echo "($2 - $1) * 1000" | bc -l)"; }

echo "== creating $n files"
python3 - "$work/src" "$n" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
per = 1000
for d in range((n + per - 1) // per):
    dd = os.path.join(root, f"d{d:04}")
    os.makedirs(dd)
    for i in range(min(per, n - d * per)):
        os.close(os.open(os.path.join(dd, f"file-{i:04}.txt"), os.O_CREAT | os.O_WRONLY, 0o644))
PY
echo "== publish"
t0=$(now); "$strata" publish --json "$work/src" "file://$work/store" meta:v1 > "$work/p.json"; t1=$(now)
echo "== cold mount"
mkdir -p "$work/mnt"
t2=$(now)
"$strata" mount "file://$work/store" "$work/mnt" --layer meta:v1 --foreground --cache-dir "$work/cache" 2> "$work/mount.log" &
pid=$!
until grep -qs " $work/mnt " /proc/mounts; do sleep 0.005; done
t3=$(now)
stat "$work/mnt/d0999/file-0999.txt" > /dev/null
t4=$(now)
rss_mount=$(awk '/RssAnon|RssFile/ {printf "%s %s kB; ", $1, $2}' /proc/$pid/status)
count=$(find "$work/mnt" | wc -l)
t5=$(now)
rss_find=$(awk '/RssAnon|RssFile/ {printf "%s %s kB; ", $1, $2}' /proc/$pid/status)
"$strata" unmount "$work/mnt"; wait "$pid"
manifest=$(python3 -c "import json; print(json.load(open('$work/p.json'))['layer'])")
echo
echo "| measure | value |"
echo "|---|---|"
echo "| files | $n (find saw $count entries) |"
echo "| publish | $(ms "$t0" "$t1") |"
echo "| manifest size (plain) | $(stat -c %s "$work/cache/layers/${manifest#blake3:}") bytes |"
echo "| cold mount until visible | $(ms "$t2" "$t3") |"
echo "| stat of one deep file | $(ms "$t3" "$t4") |"
echo "| find of the whole tree | $(ms "$t4" "$t5") |"
echo "| RSS after mount | $rss_mount |"
echo "| RSS after find | $rss_find |"
