#!/usr/bin/env bash
# strata's main job on the embedded default store (a local directory, no S3 needed):
# build, publish a sample directory, list and inspect it, mount it through FUSE, read it,
# write to the mount's scratch upper, keep state in a persistent volume across mounts, run a
# command in a sandbox with `strata run` (as root), unmount. Leaves nothing mounted; prints
# where the store and cache went.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v fusermount3 >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null
  else
    echo "demo: install fuse3 first (sudo apt-get install fuse3)" >&2; exit 1
  fi
fi

echo "== building strata (release)"
cargo build --release -p strata --locked
strata=${CARGO_TARGET_DIR:-$PWD/target}/release/strata

work=$(mktemp -d /tmp/strata-demo.XXXXXX)
store="file://$work/store"
echo "== sample directory in $work/sample"
mkdir -p "$work/sample/docs" "$work/sample/data/empty"
echo "hello from strata" > "$work/sample/hello.txt"
printf 'line %s\n' $(seq 1 1000) > "$work/sample/docs/lines.txt"
head -c $((32 << 20)) /dev/urandom > "$work/sample/data/blob.bin"
ln -s ../hello.txt "$work/sample/docs/hello-link"

echo "== strata publish"
"$strata" publish "$work/sample" "$store" demo:v1
echo "== strata ls"
"$strata" ls "$store"
echo "== strata inspect"
"$strata" inspect "$store" demo:v1
echo "== strata cat"
"$strata" cat "$store" demo:v1 hello.txt

echo "== strata daemon (one chunk cache for every mount on this host)"
export STRATA_SOCKET=$work/daemon.sock
"$strata" daemon --cache-dir "$work/cache" --state-dir "$work/state" --cache-size 1G 2> "$work/daemon.log" &
daemon=$!
trap 'kill $daemon 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do "$strata" mounts >/dev/null 2>&1 && break; sleep 0.1; done

echo "== strata mount (twice: the second mount reads from the shared cache)"
mkdir -p "$work/mnt" "$work/mnt2"
"$strata" mount "$store" "$work/mnt" --layer demo:v1
"$strata" mount "$store" "$work/mnt2" --layer demo:v1 --read-only
"$strata" mounts
ls -la "$work/mnt" "$work/mnt/docs"
cat "$work/mnt/docs/hello-link"
cmp "$work/mnt/data/blob.bin" "$work/sample/data/blob.bin" && echo "data/blob.bin: identical through the mount"
cmp "$work/mnt2/data/blob.bin" "$work/sample/data/blob.bin" && echo "data/blob.bin: identical through the second mount"
echo "== writing: each mount has its own scratch upper; the layer never changes"
echo "edited in the first mount" >> "$work/mnt/hello.txt"
mkdir "$work/mnt/results" && echo 42 > "$work/mnt/results/answer.txt"
rm "$work/mnt/docs/lines.txt"
ls "$work/mnt" "$work/mnt/docs"
cat "$work/mnt/hello.txt"
echo "-- the second (read-only) mount still shows the layer:"
cat "$work/mnt2/hello.txt"; ls "$work/mnt2/docs"
echo "== a persistent volume: changes committed to the store, seen by the next mount"
mkdir -p "$work/vol"
"$strata" mount "$store" "$work/vol" --volume demo/state
echo "first invocation" > "$work/vol/notes.txt"
"$strata" commit "$work/vol"
echo "more, committed when the mount ends" >> "$work/vol/notes.txt"
"$strata" unmount "$work/vol"
"$strata" mount "$store" "$work/vol" --volume demo/state
cat "$work/vol/notes.txt"
"$strata" unmount "$work/vol"
"$strata" volume history "$store" demo/state
if [ "$(id -u)" = 0 ]; then
  echo "== strata run: the dataset at /data, the volume at /persist, in a sandbox of its own"
  "$strata" run "$store" --dataset demo:v1 --volume demo/state -- \
    sh -c 'cat /data/hello.txt; echo "from a sandboxed run" >> /persist/notes.txt; ls /; env'
  echo "-- and as an unprivileged user, the layer's modes apply:"
  "$strata" run "$store" --dataset demo:v1 --uid 65534 --gid 65534 -- \
    sh -c 'id; touch /data/new.txt || echo "(denied, as the modes say)"'
  "$strata" mount "$store" "$work/vol" --volume demo/state
  tail -1 "$work/vol/notes.txt"
  "$strata" unmount "$work/vol"
else
  echo "== (strata run skipped: it needs root for its namespaces)"
fi
echo "== strata stats"
"$strata" stats
echo "== strata unmount, and the daemon stops (SIGTERM unmounts whatever is left)"
"$strata" unmount "$work/mnt"
kill -TERM "$daemon"; wait "$daemon" || true
trap - EXIT
if grep -qs "$work/mnt" /proc/self/mounts; then echo "demo: a mount was left behind" >&2; exit 1; fi
if [ -n "$(ls -A "$work/state/scratch" 2>/dev/null)" ]; then echo "demo: a scratch was left behind" >&2; exit 1; fi
echo "done: store in $work/store, cache in $work/cache (scratch uppers are gone with their mounts)"
