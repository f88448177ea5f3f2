#!/usr/bin/env bash
# Garbage collection on a realistic history (issue #14), on one Garage on loopback: a 200 MB
# dataset published 50 times with 2% of it changed each time, and a volume with 200 commits
# (a squash every 20); then `strata gc` with a retention of 4 earlier versions. Prints store
# bytes before and after, what was freed, what is left against what is live, the collection's
# time and requests, and checks the current version and the volume byte for byte afterwards.
#
#   sudo bench/gc.sh                              # about 5 minutes on 2 cores
#   GC_VERSIONS=10 GC_MB=50 GC_COMMITS=40 ...     # smaller
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib/garage.sh
source bench/lib/measure.sh
source bench/lib/daemon.sh
[ "$(id -u)" = 0 ] || { echo "run as root (FUSE mounts)" >&2; exit 1; }
command -v garage >/dev/null || cargo install garage --locked --version '^2.5'
command -v bc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y bc >/dev/null

versions=${GC_VERSIONS:-50}
mb=${GC_MB:-200}
commits=${GC_COMMITS:-200}
keep=4

if [ -n "${STRATA_BIN:-}" ]; then
  strata=$STRATA_BIN
else
  cargo build --release -p strata --locked
  strata=${CARGO_TARGET_DIR:-$PWD/target}/release/strata
fi
work=$(mktemp -d /tmp/strata-gcbench.XXXXXX)
# This script is the store's only writer, and says so: Garage ignores If-Match, so refs move
# (and gc runs) there only with --single-writer.
export STRATA_SOCKET=$work/daemon.sock STRATA_SINGLE_WRITER=1
bench_init "$work"
DAEMON_BIN=$strata DAEMON_STATE=$work/state

cleanup() {
  set +e
  bench_cleanup
  quickack_off; garage_stop; rm -rf "$work"
}
trap cleanup EXIT
garage_start "$work/garage"
quickack_on
store=s3://bench
data=$work/data
files=$((mb / 2))   # 2 MB files

json_get() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d' + sys.argv[1]))" "$1"; }
mib() { echo "scale=1; $1 / 1048576" | bc; }

echo "== $versions versions of a $mb MB dataset, 2% changed each time"
python3 - "$data" "$files" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
os.makedirs(root, exist_ok=True)
for i in range(n):
    with open(os.path.join(root, f"part-{i:04}.bin"), "wb") as f:
        f.write(os.urandom(2 << 20))
PY
publish_start=$(now)
for v in $(seq 1 "$versions"); do
  if [ "$v" -gt 1 ]; then
    # 2% of the files, rewritten with new bytes.
    python3 - "$data" "$files" "$v" <<'PY'
import os, random, sys
root, n, v = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(v)
for i in rng.sample(range(n), max(1, n // 50)):
    with open(os.path.join(root, f"part-{i:04}.bin"), "wb") as f:
        f.write(os.urandom(2 << 20))
PY
  fi
  "$strata" publish "$data" $store ds:latest > /dev/null 2>> "$work/cli.log"
done
publish_secs=$(echo "$(now) - $publish_start" | bc -l)

echo "== a volume: $commits commits, a squash every 20"
daemon_start
vol=$work/vol
mkdir -p "$vol"
"$strata" mount $store "$vol" --volume bench/vol > /dev/null
expect=$work/expect
mkdir -p "$expect"
commit_start=$(now)
for c in $(seq 1 "$commits"); do
  # A new 256 KiB file, and one of the last ten rewritten: deltas that later ones shadow.
  head -c 262144 /dev/urandom > "$expect/new-$c.bin"
  cp "$expect/new-$c.bin" "$vol/new-$c.bin"
  old=$(( (c % 10) + 1 ))
  if [ -f "$expect/new-$old.bin" ]; then
    head -c 262144 /dev/urandom > "$expect/new-$old.bin"
    cp "$expect/new-$old.bin" "$vol/new-$old.bin"
  fi
  "$strata" commit "$vol" > /dev/null 2>> "$work/cli.log"
  if [ $((c % 20)) -eq 0 ]; then
    "$strata" volume squash $store bench/vol > /dev/null 2>> "$work/cli.log"
  fi
done
commit_secs=$(echo "$(now) - $commit_start" | bc -l)
"$strata" unmount "$vol"
daemon_stop

"$strata" retain $store ds --keep-history $keep > /dev/null
sleep 1.1   # store times have a resolution of a second: let the last writes age past --grace 0s
# --keep-replaced 0s: what the volume's squashes replaced goes now (no mount is left), not in
# a week.
before=$("$strata" du --json --grace 0s --keep-replaced 0s $store)
report=$("$strata" gc --json $store --grace 0s --keep-replaced 0s)
after=$("$strata" du --json --grace 0s --keep-replaced 0s $store)

echo "== checking what is left, byte for byte"
cmp <("$strata" cat $store ds:latest part-0000.bin) "$data/part-0000.bin"
daemon_start
"$strata" mount $store "$vol" --volume bench/vol > /dev/null
diff -r "$expect" "$vol" > /dev/null && echo "volume: every file equal"
"$strata" unmount "$vol"
daemon_stop

before_bytes=$(echo "$before" | json_get "['total']['bytes']")
before_objects=$(echo "$before" | json_get "['total']['objects']")
dead_before=$(echo "$before" | json_get "['dead']['freeable']")
freed=$(echo "$report" | json_get "['freed_bytes']")
after_bytes=$(echo "$after" | json_get "['total']['bytes']")
after_objects=$(echo "$after" | json_get "['total']['objects']")
in_live=$(echo "$after" | json_get "['dead']['in_live_packs']")
dead_after=$(echo "$after" | json_get "['dead']['freeable']")
gc_secs=$(echo "$report" | json_get "['secs']")
requests=$(echo "$report" | python3 -c "
import json,sys; r=json.load(sys.stdin)['requests']
gets=r['get']+r['get_range']+r['get_versioned']; puts=r['put']+r['compare_and_swap']
print(f\"{gets+puts+r['head']+r['list']+r['delete']} ({gets} GET, {puts} PUT, {r['head']} HEAD, {r['list']} LIST, {r['delete']} DELETE)\")")
live_layers=$(echo "$report" | json_get "['live_layers']")
rewritten=$(echo "$report" | json_get "['rewrite']['packs']['objects']")
rewritten_bytes=$(echo "$report" | json_get "['rewrite']['packs']['bytes']")
copied=$(echo "$report" | json_get "['rewrite']['copied']")

out=$(mktemp)
{
  echo "## strata gc on a history: $versions versions of a $mb MB dataset (2% changed each), $commits volume commits"
  echo
  echo "strata $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, Garage on loopback, $(date -u +%Y-%m-%dT%H:%MZ). Retention: $keep earlier versions."
  echo
  echo "| measure | value |"
  echo "|---|---|"
  echo "| publishing $versions versions | $(fmt "$publish_secs" 1) s |"
  echo "| $commits commits (squash every 20) | $(fmt "$commit_secs" 1) s |"
  echo "| store before gc | $(mib "$before_bytes") MiB, $before_objects objects |"
  echo "| dead before gc (\`du\`) | $(mib "$dead_before") MiB |"
  echo "| freed by gc | $(mib "$freed") MiB |"
  echo "| store after gc | $(mib "$after_bytes") MiB, $after_objects objects ($live_layers live layers) |"
  echo "| packs rewritten (less than half live) | $rewritten packs, $(mib "$rewritten_bytes") MiB; $(mib "$copied") MiB live copied |"
  echo "| of what is left, unused inside live packs | $(mib "$in_live") MiB |"
  echo "| left per live byte | $(echo "scale=3; $after_bytes / ($after_bytes - $in_live)" | bc) |"
  echo "| dead left after gc (\`du\`) | $(mib "$dead_after") MiB |"
  echo "| gc time | $(fmt "$gc_secs" 2) s |"
  echo "| gc requests | $requests |"
} | tee "$out"
mkdir -p bench/results
cp "$out" "bench/results/gc-$(date -u +%Y%m%d-%H%M%S).md"
