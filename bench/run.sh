#!/usr/bin/env bash
# The read benchmark (issue #3): strata's host daemon side by side with native ext4, the raw
# S3 download speed, `rclone mount --vfs-cache-mode full` and `s3fs -o use_cache`, all on one
# Garage on loopback with quick ACKs on, in one run. Prints a markdown table and saves it in
# bench/results/ with the machine's details.
#
#   sudo bench/run.sh            # everything (about 10 minutes on 2 cores)
#   BENCH_SKIP_OTHERS=1 ...      # strata and native only (no rclone/s3fs rows)
#   STRATA_BIN=/path/strata ...  # measure that binary instead of building this tree
#
# Cold = empty chunk cache and page cache dropped; warm = chunks (and, for files read whole,
# their local copies, read by the kernel through FUSE passthrough) in the daemon's disk cache,
# page cache dropped. Figures are one run, or the best of two or three where the table says so;
# compare the ratios, not the absolute numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib/garage.sh
source bench/lib/measure.sh
source bench/lib/daemon.sh
source bench/lib/fusetrace.sh
[ "$(id -u)" = 0 ] || { echo "run as root (FUSE mounts, dropping caches, loopback routes)" >&2; exit 1; }

need=()
for tool in fusermount3:fuse3 fio:fio bc:bc curl:curl; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if [ -z "${BENCH_SKIP_OTHERS:-}" ]; then
  command -v rclone >/dev/null || need+=(rclone)
  command -v s3fs >/dev/null || need+=(s3fs)
fi
[ ${#need[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}" >/dev/null
python3 -c 'import boto3' 2>/dev/null || pip3 install -q boto3
command -v garage >/dev/null || cargo install garage --locked --version '^2.5'

# STRATA_BIN measures a strata binary built elsewhere (an older commit, for before/after).
if [ -n "${STRATA_BIN:-}" ]; then
  strata=$STRATA_BIN
else
  cargo build --release -p strata --locked
  strata=${CARGO_TARGET_DIR:-$PWD/target}/release/strata
fi
work=$(mktemp -d /tmp/strata-bench.XXXXXX)
export STRATA_SOCKET=$work/daemon.sock
bench_init "$work"
# The daemon (bench/lib/daemon.sh): cache in $work/cache, its default state dir; daemon_stop
# keeps the peak RSS in PEAK_RSS_KB.
DAEMON_BIN=$strata

cleanup() { # unmounts, then ends the daemon, rclone and s3fs this run started (by pid)
  set +e
  bench_cleanup
  fuse_trace_restore; quickack_off; garage_stop; rm -rf "$work"
  # The halt-polling and wake_here rows change machine-wide settings: put them back.
  [ -z "${halt_poll_was:-}" ] || echo "$halt_poll_was" > "$halt_poll"
  [ -z "${wake_here_was:-}" ] || echo "$wake_here_was" > "$wake_here"
}
trap cleanup EXIT
garage_start "$work/garage"
quickack_on
store=s3://bench

# Mounts neither record nor replay start records unless a row says so (smount_learning): a
# record left by one row would otherwise fetch ahead for the next.
# (A binary from before start records, run as STRATA_BIN, has neither flag nor records.)
if "$strata" mount --help | grep -q -- --no-prefetch-record; then
  no_learning=(--no-prefetch-record --no-prefetch-replay)
else
  no_learning=()
fi
smount() { mkdir -p "$2"; "$strata" mount $store "$2" --layer "$1" "${no_learning[@]}" "${@:3}" > /dev/null; }
smount_learning() { mkdir -p "$2"; "$strata" mount $store "$2" --layer "$1" "${@:3}" > /dev/null; }
mount_stat() { # mountpoint field → a field of the mount's read stats (0 if not mounted)
  "$strata" stats --json | python3 -c "import json,sys; print(next((m['stats'][sys.argv[2]] for m in json.load(sys.stdin)['mounts'] if m['mountpoint'] == sys.argv[1]), 0))" "$(realpath "$1")" "$2"
}
sumount() { "$strata" unmount "$1"; }
stat_total() { "$strata" stats --json | python3 -c "import json,sys; print(json.load(sys.stdin)['total']['$1'])"; }

# ---------------------------------------------------------------------------------------
echo "== making the data"
data=$work/data
mkdir -p "$data/big" "$data/tree" "$data/small" "$data/py"
head -c $((1 << 30)) /dev/urandom > "$data/big/model.bin"
python3 - "$data" <<'PY'
import os, random, sys
root = sys.argv[1]
rnd = random.Random(7)
for i in range(20000):                      # 20,000 small files, 200 dirs
    d = os.path.join(root, "tree", f"d{i % 200:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05d}.dat"), "wb") as f:
        f.write(os.urandom(rnd.randint(100, 8192)))
for i in range(5000):                       # 5,000 files of 4 KiB, 50 dirs
    d = os.path.join(root, "small", f"d{i % 50:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:04d}.txt"), "wb") as f:
        f.write(os.urandom(4096))
PY
py_packages="numpy pandas requests pyyaml"
py_import="import numpy, pandas, requests, yaml"
if ! pip3 install -q --no-warn-script-location --target "$data/py" $py_packages > "$work/pip.log" 2>&1; then
  echo "pip install failed (no PyPI?); the Python rows are skipped" >&2; py_import=
fi
sync

echo "== publishing"
daemon_cold
for ds in big tree small py; do
  [ "$ds" = py ] && [ -z "$py_import" ] && continue
  "$strata" publish "$data/$ds" $store "$ds:v1" > /dev/null
done

# ---------------------------------------------------------------------------------------
disk_dev=$(lsblk -no pkname "$(df --output=source "$work" | tail -1)" 2>/dev/null | head -1)
[ -n "$disk_dev" ] || disk_dev=$(basename "$(df --output=source "$work" | tail -1)")
disk_read_mib() { awk '{print int($3 * 512 / 1048576)}' "/sys/block/$disk_dev/stat"; }
disk_written_mib() { sync; awk '{print int($7 * 512 / 1048576)}' "/sys/block/$disk_dev/stat"; }
cpu_secs() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; } # pid → user+system CPU-seconds
# CPU-seconds the whole machine has been busy (every process and the kernel: the store, the
# client, strata, page-cache copies), to tell whether a run is bounded by the cores.
machine_busy() { awk '/^cpu /{printf "%.2f", ($2 + $3 + $4 + $7 + $8 + $9) / 100}' /proc/stat; }

echo "== sequential read of 1 GiB"
# This machine's disk varies a lot from run to run: native is the best of three.
native_runs=()
for _ in 1 2 3; do
  drop_caches
  native_runs+=("$(mibs 1024 "$(timed cat "$data/big/model.bin")")")
done
native_seq=$(max "${native_runs[@]}")
smount big:v1 "$work/m/big"
drop_caches
g0=$(garage_get_count)
cpu0=$(cpu_secs "$DAEMON_PID"); w0=$(disk_written_mib); busy0=$(machine_busy)
cold_seq_s=$(timed cat "$work/m/big/model.bin")
cold_busy=$(echo "$(machine_busy) - $busy0" | bc -l)
cold_seq=$(mibs 1024 "$cold_seq_s")
cold_cpu=$(echo "$(cpu_secs "$DAEMON_PID") - $cpu0" | bc -l)
cold_gets=$(( $(garage_get_count) - g0 ))
cold_store_bytes=$(stat_total store_bytes)
sumount "$work/m/big"
# Closing the fully read file starts assembling its local copy in the background (for FUSE
# passthrough); the warm runs below read it once it is there.
wait_assembled() { # up to 60 s: a full disk, say, leaves the file unassembled (see the log)
  local i
  for i in $(seq 1 600); do [ "$(stat_total disk_files)" -ge 1 ] && return 0; sleep 0.1; done
  echo "no local copy of the file after 60 s; warm reads go through strata" >&2
}
assembly_secs=$(timed wait_assembled)
cold_written=$(( $(disk_written_mib) - w0 ))   # the file's local copy (its chunks, written once)
# Warm: the chunks (and the file's copy) are in the daemon's disk cache; page cache dropped,
# mount made afresh. Best of two, each after a native read of its own (this disk's speed
# changes from minute to minute); and whether the kernel read the local copy (passthrough).
warm_runs=(); warm_natives=(); warm_direct=()
for _ in 1 2; do
  drop_caches
  warm_natives+=("$(mibs 1024 "$(timed cat "$data/big/model.bin")")")
  smount big:v1 "$work/m/big"
  drop_caches
  warm_runs+=("$(mibs 1024 "$(timed cat "$work/m/big/model.bin")")")
  warm_direct+=("$(mount_stat "$work/m/big" passthrough_opens)")
  sumount "$work/m/big"
done
warm_seq=$(max "${warm_runs[@]}"); native_warm_seq=$(max "${warm_natives[@]}")
smount big:v1 "$work/m/big"

echo "== random 4 KiB reads (fio), warm, vs native"
# Bytes read from the disk during a run, beside the IOPS: readahead can turn random 4 KiB reads
# into large ones that fill the page cache, and then most reads never reach the disk.
fio_run() { # file qd → "iops p50_us p99_us disk_read_MiB"
  local jobs=$2 before
  before=$(disk_read_mib)
  fio --name=r --filename="$1" --readonly --rw=randread --bs=4k --ioengine=psync \
    --numjobs="$jobs" --group_reporting --time_based --runtime=8 --invalidate=1 \
    --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["read"]; p=j["clat_ns"]["percentile"]; print("%.0f %.1f %.1f" % (j["iops"], p["50.000000"]/1e3, p["99.000000"]/1e3), end=" ")'
  echo $(( $(disk_read_mib) - before ))
}
drop_caches; read -r nat_qd1_iops nat_qd1_p50 nat_qd1_p99 nat_qd1_disk <<< "$(fio_run "$data/big/model.bin" 1)"
drop_caches; read -r nat_qd16_iops nat_qd16_p50 nat_qd16_p99 nat_qd16_disk <<< "$(fio_run "$data/big/model.bin" 16)"
drop_caches; read -r st_qd1_iops st_qd1_p50 st_qd1_p99 st_qd1_disk <<< "$(fio_run "$work/m/big/model.bin" 1)"
drop_caches; read -r st_qd16_iops st_qd16_p50 st_qd16_p99 st_qd16_disk <<< "$(fio_run "$work/m/big/model.bin" 16)"
sumount "$work/m/big"

echo "== sequential read of 1 GiB after a daemon restart"
# The disk cache survives; the file's copy is not trusted until verified (in the background),
# so this read goes through strata's own path and verifies each chunk on first use.
daemon_stop; daemon_start
smount big:v1 "$work/m/big"
drop_caches
restart_seq=$(mibs 1024 "$(timed cat "$work/m/big/model.bin")")
sumount "$work/m/big"

echo "== cold random 4 KiB reads: 2,000 on a fresh mount of the 1 GiB file, then a second pass"
rand_reads() { # file [n] → reads n (2,000) random 4 KiB blocks (same seed every time)
  python3 - "$1" "${2:-2000}" <<'PY'
import os, random, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
rnd = random.Random(3)
lat = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    os.pread(fd, 4096, rnd.randrange(0, size // 4096) * 4096)
    lat.append(time.perf_counter() - t)
PY
}
daemon_cold
smount big:v1 "$work/m/big"
drop_caches
st_rand_cold=$(timed rand_reads "$work/m/big/model.bin")
# The file goes on arriving in the background; the second pass starts once it has (or 60 s).
for _ in $(seq 1 600); do [ "$(stat_total disk_files)" -ge 1 ] && break; sleep 0.1; done
st_rand_store=$(stat_total store_bytes)
drop_caches
st_rand_second=$(timed rand_reads "$work/m/big/model.bin")
sumount "$work/m/big"

echo "== a reader's p99 latency with and without a large prefetch beside it"
# 1,000 cold 4 KiB reads of small files (each waits on the store) while nothing else runs, then
# while a mount of the 1 GiB file replays a start record that read it whole (a background
# fetch of 1 GiB). A thousand, so that the p99 is the tenth slowest read, not one stray.
p99_small() { # dir → "p50 p99" latency (ms) of 1,000 reads of random small files
  python3 - "$1" <<'PY'
import os, random, sys, time
root = sys.argv[1]; rnd = random.Random(5); lat = []
files = [os.path.join(root, d, f) for d in sorted(os.listdir(root))[:100] for f in sorted(os.listdir(os.path.join(root, d)))]
for p in rnd.sample(files, 1000):
    t = time.perf_counter(); open(p, "rb").read(4096); lat.append(time.perf_counter() - t)
lat.sort(); print("%.2f %.2f" % (lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000))
PY
}
daemon_cold
smount_learning big:v1 "$work/m/rec" --no-prefetch-replay
cat "$work/m/rec/model.bin" > /dev/null   # records the model read whole (1 GiB: the record closes)
for _ in $(seq 1 300); do "$strata" inspect $store big:v1 --json --summary | grep -q '"start_record":{' && break; sleep 0.1; done
sumount "$work/m/rec"
daemon_cold
smount tree:v1 "$work/m/tree"
drop_caches; lat=$(p99_small "$work/m/tree"); read -r p50_alone p99_alone <<< "$lat"
sumount "$work/m/tree"
daemon_cold
smount_learning big:v1 "$work/m/bg" --no-prefetch-record
smount tree:v1 "$work/m/tree"
drop_caches; lat=$(p99_small "$work/m/tree"); read -r p50_beside p99_beside <<< "$lat"
bg_fetched=$(mount_stat "$work/m/bg" store_bytes)
sumount "$work/m/tree"; sumount "$work/m/bg"

echo "== find + stat of 20,000 files, warm, vs native"
find_stat() { find "$1" -printf '%s %T@ %m\n'; }
drop_caches; find_stat "$data/tree" > /dev/null
native_find=$(timed find_stat "$data/tree")
smount tree:v1 "$work/m/tree"
drop_caches; find_stat "$work/m/tree" > /dev/null
st_find=$(timed find_stat "$work/m/tree")
sumount "$work/m/tree"

# Traced Python starts (below), if the kernel has FUSE tracepoints.
probe_native=() probe_first=() probe_recorded=() probe_warm=() hp_probe_warm=() wh_probe_warm=()
if [ -n "$py_import" ]; then
  echo "== Python import: $py_import"
  py_time() { PYTHONPATH=$1 PYTHONDONTWRITEBYTECODE=1 timed python3 -c "$py_import"; }
  py_native() { drop_caches; py_time "$data/py"; }
  # Every row is the best of two or three runs, as is its native figure, and each strata run
  # comes shortly after a native run of its own (a daemon restart between them at most): this
  # disk's cold reads vary a lot, and so does the host's load from one minute to the next.
  # (No subshells below: daemon_cold must run in this shell, which tracks the daemon.)
  cold_runs=(); cold_natives=(); cold_waits=()
  for _ in 1 2; do
    cold_natives+=("$(py_native)")
    # The first start ever: nothing recorded yet is used (no replay); this start records.
    daemon_cold
    smount_learning py:v1 "$work/m/py" --no-prefetch-replay
    drop_caches; cold_runs+=("$(py_time "$work/m/py")")
    cold_waits+=("$(mount_stat "$work/m/py" store_hits)")
    for _ in $(seq 1 300); do "$strata" inspect $store py:v1 --json --summary | grep -q '"start_record":{' && break; sleep 0.1; done
    sumount "$work/m/py"
  done
  # recorded_and_warm [PREFIX] sets PREFIXrecorded_py and PREFIXwarm_py, with
  # PREFIXnative_recorded_py and PREFIXnative_warm_py beside them: the best of two starts on
  # another host (an empty cache) after those starts, whose mounts fetch ahead what they read,
  # and of three warm starts; and PREFIXrecorded_waits, how many reads of each recorded start
  # waited on the store.
  recorded_and_warm() {
    local p=${1:-} runs=() natives=() warm_runs=() warm_natives=() waits=()
    for _ in 1 2; do
      natives+=("$(py_native)")
      daemon_cold
      smount_learning py:v1 "$work/m/py" --no-prefetch-record
      drop_caches; runs+=("$(py_time "$work/m/py")")
      waits+=("$(mount_stat "$work/m/py" store_hits)")
      sumount "$work/m/py"
    done
    printf -v "${p}recorded_py" %s "$(min "${runs[@]}")"
    printf -v "${p}native_recorded_py" %s "$(min "${natives[@]}")"
    printf -v "${p}recorded_waits" %s "${waits[*]}"
    smount py:v1 "$work/m/py"
    for _ in 1 2 3; do
      warm_natives+=("$(py_native)")
      warm_runs+=("$(drop_caches; py_time "$work/m/py")")
    done
    sumount "$work/m/py"
    printf -v "${p}warm_py" %s "$(min "${warm_runs[@]}")"
    printf -v "${p}native_warm_py" %s "$(min "${warm_natives[@]}")"
  }
  recorded_and_warm
  cold_py=$(min "${cold_runs[@]}"); native_cold_py=$(min "${cold_natives[@]}")

  # Where a start's time goes: one more start of each kind, traced. The kernel's FUSE
  # tracepoints give every request to the mount and when it was answered; the sum of their
  # times (releases and forgets left out: no one waits for them) bounds what the start waited
  # on strata from above: disk reads are in it (a native start makes those in its own system
  # calls), and requests that overlap (the kernel's readahead) add up. The machine's busy CPU-seconds during the start, and the store's and the
  # daemon's share of them, show what else ran on the two cores meanwhile.
  if fuse_trace_ready; then
    py_probe() { # dir → "secs requests wait_ms busy_s garage_s daemon_s"
      local b0 g0 d0 d=0 trace secs
      drop_caches
      b0=$(machine_busy); g0=$(cpu_secs "$GARAGE_PID")
      [ -z "$DAEMON_PID" ] || d0=$(cpu_secs "$DAEMON_PID")
      fuse_trace_on
      secs=$(py_time "$1")
      trace=$(fuse_trace_off "$1")
      [ -z "$DAEMON_PID" ] || d=$(echo "$(cpu_secs "$DAEMON_PID") - $d0" | bc -l)
      echo "$secs $trace $(echo "$(machine_busy) - $b0" | bc -l) $(echo "$(cpu_secs "$GARAGE_PID") - $g0" | bc -l) $d"
    }
    probe_into() { # NAME dir: the array NAME = py_probe's six figures (empty if it failed)
      local out
      out=$(py_probe "$2")
      read -r -a "$1" <<< "$out"
      local -n got=$1
      if [ "${#got[@]}" -ne 6 ]; then
        echo "a traced Python start gave '$out'; its rows are left out" >&2
        got=()
      fi
    }
    daemon_stop
    probe_into probe_native "$data/py"
    daemon_cold
    smount_learning py:v1 "$work/m/py" --no-prefetch-replay --no-prefetch-record
    probe_into probe_first "$work/m/py"
    sumount "$work/m/py"
    daemon_cold
    smount_learning py:v1 "$work/m/py" --no-prefetch-record
    probe_into probe_recorded "$work/m/py"
    sumount "$work/m/py"
    smount py:v1 "$work/m/py"
    probe_into probe_warm "$work/m/py"
    sumount "$work/m/py"
  fi
fi

echo "== small files: find + cat of 5,000 x 4 KiB"
find_cat() { find "$1" -type f -exec cat {} +; }
native_small=$(min "$(drop_caches; timed find_cat "$data/small")" "$(drop_caches; timed find_cat "$data/small")")
daemon_cold
smount small:v1 "$work/m/small"
drop_caches; cold_small=$(timed find_cat "$work/m/small")
sumount "$work/m/small"
smount small:v1 "$work/m/small"
drop_caches; warm_small=$(timed find_cat "$work/m/small")
# Hot: the same again with the page cache kept (what each open and close costs).
hot_small=$(min "$(timed find_cat "$work/m/small")" "$(timed find_cat "$work/m/small")")
sumount "$work/m/small"
smount small:v1 "$work/m/small-ro" --read-only
find_cat "$work/m/small-ro" > /dev/null
hot_small_ro=$(min "$(timed find_cat "$work/m/small-ro")" "$(timed find_cat "$work/m/small-ro")")
sumount "$work/m/small-ro"
find_cat "$data/small" > /dev/null
native_hot_small=$(min "$(timed find_cat "$data/small")" "$(timed find_cat "$data/small")")

# again_with PREFIX: the rows that FUSE round trips bound (the Python starts, hot small files)
# measured again, under a machine setting the caller has made, into PREFIX-named figures.
again_with() {
  local p=$1 firsts=() natives=()
  if [ -n "$py_import" ]; then
    for _ in 1 2; do
      natives+=("$(py_native)")
      daemon_cold
      smount_learning py:v1 "$work/m/py" --no-prefetch-replay
      drop_caches; firsts+=("$(py_time "$work/m/py")")
      sumount "$work/m/py"
    done
    printf -v "${p}first_py" %s "$(min "${firsts[@]}")"
    printf -v "${p}native_first_py" %s "$(min "${natives[@]}")"
    recorded_and_warm "$p"
    if [ "${#probe_warm[@]}" = 6 ]; then
      smount py:v1 "$work/m/py"
      probe_into "${p}probe_warm" "$work/m/py"
      sumount "$work/m/py"
    fi
  fi
  smount small:v1 "$work/m/small"
  find_cat "$work/m/small" > /dev/null
  printf -v "${p}hot_small" %s "$(min "$(timed find_cat "$work/m/small")" "$(timed find_cat "$work/m/small")")"
  sumount "$work/m/small"
  printf -v "${p}native_hot_small" %s "$(min "$(timed find_cat "$data/small")" "$(timed find_cat "$data/small")")"
}

# setting_rows PREFIX LONG SHORT: the table rows of again_with PREFIX (nothing for what it did
# not measure), named "LONG: …" first and "SHORT: …" after.
setting_rows() {
  local p=$1 long=$2 short=$3
  local f=${p}first_py r=${p}recorded_py w=${p}warm_py nf nr nw
  local -n probe=${p}probe_warm
  if [ -n "${!w:-}" ]; then
    nf=${p}native_first_py nr=${p}native_recorded_py nw=${p}native_warm_py
    echo "| $long: Python import, first start ever / on another host after one recorded start / warm (s) | $(fmt "${!f}" 3) / $(fmt "${!r}" 3) / $(fmt "${!w}" 3) | $(fmt "${!nf}" 3) / $(fmt "${!nr}" 3) / $(fmt "${!nw}" 3) | | | $(fmt "$(ratio "${!f}" "${!nf}")")× / $(fmt "$(ratio "${!r}" "${!nr}")")× / $(fmt "$(ratio "${!w}" "${!nw}")")× native |"
  fi
  if [ "${#probe[@]}" = 6 ]; then
    echo "| $short: Python import warm, traced: seconds; requests to the mount and their summed time (ms) | $(fmt "${probe[0]}" 3); ${probe[1]} requests, $(fmt "${probe[2]}" 0) ms | | | | without: $(fmt "${probe_warm[2]}" 0) ms |"
  fi
  local hot=${p}hot_small native=${p}native_hot_small
  if [ -n "${!hot:-}" ]; then
    echo "| $short: find + cat 5,000 × 4 KiB hot, scratch mount (s) | $(fmt "${!hot}" 3) | $(fmt "${!native}" 3) | | | $(fmt "$(ratio "${!hot}" "${!native}")")× native time |"
  fi
}

# Each FUSE request is a round trip between two processes: on a VM whose idle vCPUs halt at
# once (guest halt-polling off, as Firecracker guests often boot), waking the other side costs
# a hypervisor exit each way. The rows below are measured again with halt-polling on (the
# platform's knob, restored after) to show how much of the gap to native is that wake.
halt_poll=/sys/module/haltpoll/parameters/guest_halt_poll_ns
halt_poll_was=$( [ -w "$halt_poll" ] && cat "$halt_poll" || true)
if [ "$halt_poll_was" = 0 ] && [ "$(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null)" = haltpoll ]; then
  echo "== the same with guest halt-polling on (200 µs): Python import, hot small files"
  echo 200000 > "$halt_poll"
  again_with hp_
  echo "$halt_poll_was" > "$halt_poll"
fi
# Some kernels' fuse module has a wake_here parameter: with it on, the side of a round trip
# that waits is woken on the vCPU that answered it, so no halted vCPU needs waking. The same
# rows again with it on (restored after), halt-polling as the VM booted.
wake_here=/sys/module/fuse/parameters/wake_here
wake_here_was=$( [ -w "$wake_here" ] && cat "$wake_here" || true)
if [ "$wake_here_was" = N ]; then
  echo "== the same with the fuse module's wake_here on: Python import, hot small files"
  echo Y > "$wake_here"
  again_with wh_
  echo "$wake_here_was" > "$wake_here"
fi

echo "== fan-out: 8 mounts read the same 1 GiB, cold"
daemon_cold
for i in $(seq 1 8); do smount big:v1 "$work/m/fan$i"; done
drop_caches
fan_read() { for i in $(seq 1 8); do cat "$work/m/fan$i/model.bin" > /dev/null & done; wait; }
fan_secs=$(timed fan_read)
fan_store=$(stat_total store_bytes)
for i in $(seq 1 8); do sumount "$work/m/fan$i"; done

echo "== fan-out, read-only: 8 read-only mounts (one shared FUSE session) read the same 1 GiB, cold"
daemon_cold
for i in $(seq 1 8); do smount big:v1 "$work/m/rofan$i" --read-only; done
drop_caches
rofan_read() { for i in $(seq 1 8); do cat "$work/m/rofan$i/model.bin" > /dev/null & done; wait; }
rofan_secs=$(timed rofan_read)
rofan_store=$(stat_total store_bytes)
for i in $(seq 1 8); do sumount "$work/m/rofan$i"; done

echo "== writes on a scratch mount: a new 1 GiB file; copy-up of the 1 GiB layer file"
smount big:v1 "$work/m/big"
write_new() { dd if=/dev/zero of="$1" bs=1M count=1024 conv=fsync status=none; }
write_runs() { # dir → best MiB/s of two
  local runs=() _
  for _ in 1 2; do
    runs+=("$(mibs 1024 "$(timed write_new "$1/new.bin")")"); rm -f "$1/new.bin"; sync
  done
  max "${runs[@]}"
}
native_write=$(write_runs "$data")
st_write=$(write_runs "$work/m/big")
# Copy-up, with the layer's chunks cached (the cold read is measured above): the first 4 KiB
# write into the middle of the file, then a 4 KiB write into every MiB of it (each one makes
# strata copy its block up), fsync'ed. Native does the same to a copy of the file on ext4.
copy_up_writes() { # file → "first_write_ms total_s"
  python3 - "$1" <<'PY'
import os, sys, time
path, mib = sys.argv[1], 1 << 20
t0 = time.monotonic()
fd = os.open(path, os.O_WRONLY)
os.pwrite(fd, b"x" * 4096, 512 * mib)
first = time.monotonic() - t0
for off in range(0, os.fstat(fd).st_size, mib):
    os.pwrite(fd, b"y" * 4096, off)
os.fsync(fd)
os.close(fd)
print("%.2f %.3f" % (first * 1e3, time.monotonic() - t0))
PY
}
cp "$data/big/model.bin" "$data/copy.bin"; sync
drop_caches; read -r native_first_ms native_copyup_s <<< "$(copy_up_writes "$data/copy.bin")"
rm -f "$data/copy.bin"
cat "$work/m/big/model.bin" > /dev/null
drop_caches; read -r st_first_ms st_copyup_s <<< "$(copy_up_writes "$work/m/big/model.bin")"
sumount "$work/m/big"
daemon_stop

# ---------------------------------------------------------------------------------------
others=
if [ -z "${BENCH_SKIP_OTHERS:-}" ]; then
  others=1
  echo "== the same data as plain objects, for the raw download, rclone and s3fs"
  export RCLONE_CONFIG_G_TYPE=s3 RCLONE_CONFIG_G_PROVIDER=Other RCLONE_CONFIG_G_ENDPOINT=$AWS_ENDPOINT_URL \
    RCLONE_CONFIG_G_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID RCLONE_CONFIG_G_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY \
    RCLONE_CONFIG_G_REGION=garage RCLONE_CONFIG_G_FORCE_PATH_STYLE=true
  # rclone 1.60 fails with AWS_CA_BUNDLE set (GARAGE.md).
  rcl() { env -u AWS_CA_BUNDLE rclone "$@"; }
  rcl copyto "$data/big/model.bin" g:bench/plain/model.bin
  rcl copy --transfers 32 "$data/small" g:bench/plain/small

  # Cold at the store as every cold row is (Garage reads its disk): the object was just
  # uploaded, and a download from the page cache would be a baseline no cold read can meet.
  drop_caches
  raw1=$(python3 bench/lib/s3get.py bench plain/model.bin 1 1024)
  drop_caches
  raw8=$(S3GET_BUSY_FILE=$work/raw8.busy python3 bench/lib/s3get.py bench plain/model.bin 8 8)
  read -r raw8_busy raw8_s < "$work/raw8.busy"

  # rclone and s3fs run in the foreground, in the background of this shell, so that $! is their
  # own pid, recorded for the cleanup (rclone called as rcl would make $! a subshell's).
  rclone_mount() {
    mkdir -p "$work/m/rclone"
    env -u AWS_CA_BUNDLE rclone mount g:bench/plain "$work/m/rclone" --vfs-cache-mode full \
      --cache-dir "$work/rclone-cache" --read-only >> "$work/rclone.log" 2>&1 &
    RCLONE_PID=$!
    bench_track_pid "$RCLONE_PID"
    bench_wait_mount "$work/m/rclone" "$RCLONE_PID" "$work/rclone.log"
  }
  rclone_umount() {
    fusermount3 -u "$work/m/rclone" || umount -l "$work/m/rclone"
    bench_stop_pid "$RCLONE_PID"; RCLONE_PID=
  }
  echo "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" > "$work/s3fs.passwd"; chmod 600 "$work/s3fs.passwd"
  s3fs_mount() {
    mkdir -p "$work/m/s3fs"
    s3fs bench:/plain "$work/m/s3fs" -f -o passwd_file="$work/s3fs.passwd" -o url="$AWS_ENDPOINT_URL" \
      -o use_path_request_style -o endpoint=garage -o use_cache="$work/s3fs-cache" -o ro \
      >> "$work/s3fs.log" 2>&1 &
    S3FS_PID=$!
    bench_track_pid "$S3FS_PID"
    bench_wait_mount "$work/m/s3fs" "$S3FS_PID" "$work/s3fs.log"
  }
  s3fs_umount() {
    umount "$work/m/s3fs" || umount -l "$work/m/s3fs"
    bench_stop_pid "$S3FS_PID"; S3FS_PID=
  }

  # Sets NAME_cold, NAME_warm (MiB/s), NAME_small_cold, NAME_small_warm and NAME_rand_cold,
  # NAME_rand_second (s) for the filesystem NAME_mount mounts at $work/m/NAME, starting from
  # an empty NAME-cache (again for the random reads).
  measure_other() {
    local name=$1 dir=$work/m/$1
    rm -rf "$work/$name-cache"; "${name}_mount"; drop_caches
    printf -v "${name}_cold" '%s' "$(mibs 1024 "$(timed cat "$dir/model.bin")")"
    drop_caches
    printf -v "${name}_warm" '%s' "$(mibs 1024 "$(timed cat "$dir/model.bin")")"
    drop_caches
    printf -v "${name}_small_cold" '%s' "$(timed find_cat "$dir/small")"
    drop_caches
    printf -v "${name}_small_warm" '%s' "$(timed find_cat "$dir/small")"
    "${name}_umount"
    rm -rf "$work/$name-cache"; "${name}_mount"; drop_caches
    printf -v "${name}_rand_cold" '%s' "$(timed rand_reads "$dir/model.bin")"
    drop_caches
    printf -v "${name}_rand_second" '%s' "$(timed rand_reads "$dir/model.bin")"
    "${name}_umount"
  }
  echo "== rclone: sequential 1 GiB cold/warm, small files cold/warm"
  measure_other rclone
  echo "== s3fs: sequential 1 GiB cold/warm, small files cold/warm"
  measure_other s3fs
fi

# ---------------------------------------------------------------------------------------
# "-dirty": the tree had changes not committed (to the code or to this script).
rev=$(git describe --always --dirty 2>/dev/null || echo unknown)
out=bench/results/run-$(date -u +%Y%m%d-%H%M%S).md
na="n/a"
{
  echo "# strata read benchmark — $(date -u '+%F %H:%M') UTC, strata ${STRATA_BIN:+binary $STRATA_BIN, tree }$rev"
  echo
  echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, kernel $(uname -r), $(df -T "$work" | awk 'NR==2 {print $2}') disk. Idle vCPUs: cpuidle driver $(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo unknown), guest halt-polling $( [ -n "$halt_poll_was" ] && echo "${halt_poll_was} ns" || echo "not available"), fuse module wake_here $( [ -n "$wake_here_was" ] && echo "$wake_here_was" || echo "not available")."
  echo "Store: Garage $(garage --version | awk '{print $2}') on loopback (quick ACKs on), sharing the cores."
  echo "Cold = empty chunk cache, page cache dropped (also before the raw downloads: the store reads its disk in every cold row). Warm = chunks (and the local copy of a file read whole, read through FUSE passthrough) in the daemon's disk cache, page cache dropped. Mounts are scratch mounts (the default). Native figures are the best of 2–3 runs (this disk is noisy), and so are the Python rows of strata, each of whose runs follows a native run of its own (the native figure beside a Python row is from those runs)."
  echo
  echo "| measure | strata | native ext4 | rclone | s3fs | strata vs |"
  echo "|---|---|---|---|---|---|"
  if [ -n "$others" ]; then
    echo "| raw download of the 1 GiB object: 1 GET / 8 parallel 8 MiB ranged GETs (MiB/s) | | | | | $(fmt "$raw1" 0) / $(fmt "$raw8" 0) |"
    echo "| seq read 1 GiB cold (MiB/s) | $(fmt "$cold_seq" 0) | | $(fmt "$rclone_cold" 0) | $(fmt "$s3fs_cold" 0) | $(fmt "$(ratio "$cold_seq" "$raw8")")× raw 8-GET, $(fmt "$(ratio "$cold_seq" "$s3fs_cold")")× s3fs |"
    ncpu=$(nproc)
    echo "| whole machine busy (store, client, kernel, strata) per GiB: strata cold read / raw 8-GET download (CPU-s; share of the $ncpu cores busy) | $(fmt "$cold_busy" 2) ($(fmt "$(echo "100 * $cold_busy / ($ncpu * $cold_seq_s)" | bc -l)" 0)%) | | | | raw $(fmt "$raw8_busy" 2) ($(fmt "$(echo "100 * $raw8_busy / ($ncpu * $raw8_s)" | bc -l)" 0)%) |"
    echo "| seq read 1 GiB warm (MiB/s) | $(fmt "$warm_seq" 0) | $(fmt "$native_warm_seq" 0) | $(fmt "$rclone_warm" 0) | $(fmt "$s3fs_warm" 0) | $(fmt "$(ratio "$warm_seq" "$native_warm_seq")")× native, $(fmt "$(ratio "$warm_seq" "$s3fs_warm")")× s3fs; opens through passthrough: ${warm_direct[*]} |"
  else
    echo "| seq read 1 GiB cold (MiB/s) | $(fmt "$cold_seq" 0) | | | | |"
    echo "| seq read 1 GiB warm (MiB/s) | $(fmt "$warm_seq" 0) | $(fmt "$native_warm_seq" 0) | | | $(fmt "$(ratio "$warm_seq" "$native_warm_seq")")× native; opens through passthrough: ${warm_direct[*]} |"
  fi
  echo "| local copy of the 1 GiB file ready after the cold read (s) | $(fmt "$assembly_secs" 1) | | | | |"
  echo "| seq read 1 GiB warm after a daemon restart: through strata, verifying each chunk once (MiB/s) | $(fmt "$restart_seq" 0) | $(fmt "$native_seq" 0) | | | $(fmt "$(ratio "$restart_seq" "$native_seq")")× native |"
  echo "| cold 1 GiB read: store GETs / bytes fetched | $cold_gets / $(fmt "$(echo "$cold_store_bytes / 1048576" | bc -l)" 0) MiB | | | | |"
  echo "| cold 1 GiB read: daemon CPU-seconds per GiB / disk MiB written per GiB read (chunks written once, into the file's local copy) | $(fmt "$cold_cpu" 2) / $cold_written | | | | |"
  echo "| random 4 KiB QD1, warm: IOPS | $st_qd1_iops | $nat_qd1_iops | | | $(fmt "$(ratio "$st_qd1_iops" "$nat_qd1_iops")")× native |"
  echo "| random 4 KiB QD1, warm: p50 / p99 (µs) | $st_qd1_p50 / $st_qd1_p99 | $nat_qd1_p50 / $nat_qd1_p99 | | | p99 $(fmt "$(ratio "$st_qd1_p99" "$nat_qd1_p99")")× native |"
  echo "| random 4 KiB QD16 (16 jobs), warm: IOPS | $st_qd16_iops | $nat_qd16_iops | | | $(fmt "$(ratio "$st_qd16_iops" "$nat_qd16_iops")")× native |"
  echo "| random 4 KiB QD16, warm: p50 / p99 (µs) | $st_qd16_p50 / $st_qd16_p99 | $nat_qd16_p50 / $nat_qd16_p99 | | | p99 $(fmt "$(ratio "$st_qd16_p99" "$nat_qd16_p99")")× native |"
  echo "| random 4 KiB, warm: MiB read from the disk during the QD1 / QD16 runs (8 s each) | $st_qd1_disk / $st_qd16_disk | $nat_qd1_disk / $nat_qd16_disk | | | |"
  if [ -n "$others" ]; then
    echo "| random 4 KiB reads, cold: 2,000 on a fresh mount of the 1 GiB file (s) | $(fmt "$st_rand_cold" 2) | | $(fmt "$rclone_rand_cold" 2) | $(fmt "$s3fs_rand_cold" 2) | $(fmt "$(ratio "$st_rand_cold" "$s3fs_rand_cold")")× s3fs time |"
    echo "| the same 2,000 reads again, page cache dropped (s) | $(fmt "$st_rand_second" 2) | | $(fmt "$rclone_rand_second" 2) | $(fmt "$s3fs_rand_second" 2) | |"
  else
    echo "| random 4 KiB reads, cold: 2,000 on a fresh mount of the 1 GiB file / again (s) | $(fmt "$st_rand_cold" 2) / $(fmt "$st_rand_second" 2) | | | | |"
  fi
  echo "| … store bytes fetched for them, the file's background fetch included | $(fmt "$(echo "$st_rand_store / 1048576" | bc -l)" 0) MiB | | | | |"
  echo "| a reader's p50 / p99 (1,000 cold 4 KiB small-file reads), alone / beside a 1 GiB prefetch (ms) | $p50_alone / $p99_alone; $p50_beside / $p99_beside | | | | p99 $(fmt "$(ratio "$p99_beside" "$p99_alone")")×; prefetch fetched $(fmt "$(echo "$bg_fetched / 1048576" | bc -l)" 0) MiB meanwhile |"
  echo "| find + stat 20,000 files, warm (s) | $(fmt "$st_find" 3) | $(fmt "$native_find" 3) | | | $(fmt "$(ratio "$st_find" "$native_find")")× native |"
  if [ -n "$py_import" ]; then
    echo "| Python \`$py_import\` cold, first start ever (s) | $(fmt "$cold_py" 3) | $(fmt "$native_cold_py" 3) | | | $(fmt "$(ratio "$cold_py" "$native_cold_py")")× native; reads that waited on the store: ${cold_waits[*]} |"
    echo "| Python import cold on another host, after one recorded start (s) | $(fmt "$recorded_py" 3) | $(fmt "$native_recorded_py" 3) | | | $(fmt "$(ratio "$recorded_py" "$native_recorded_py")")× native; reads that waited on the store: $recorded_waits |"
    echo "| Python import warm (s) | $(fmt "$warm_py" 3) | $(fmt "$native_warm_py" 3) | | | $(fmt "$(ratio "$warm_py" "$native_warm_py")")× native |"
    if [ "${#probe_native[@]}${#probe_first[@]}${#probe_recorded[@]}${#probe_warm[@]}" = 6666 ]; then
      pr() { fmt "$1" "${2:-2}"; }
      echo "| Python import traced once more, first / recorded / warm start: seconds; requests to the mount (releases aside) and their summed time (ms) | $(pr "${probe_first[0]}" 3) / $(pr "${probe_recorded[0]}" 3) / $(pr "${probe_warm[0]}" 3); ${probe_first[1]} / ${probe_recorded[1]} / ${probe_warm[1]} requests, $(pr "${probe_first[2]}" 0) / $(pr "${probe_recorded[2]}" 0) / $(pr "${probe_warm[2]}" 0) ms | $(pr "${probe_native[0]}" 3) | | | the summed time bounds what the start waited on strata from above: disk reads are in it (native makes those in its own calls), and overlapping requests (readahead) add up |"
      echo "| … CPU-seconds the machine was busy during those starts: all (Garage, strata daemon) | $(pr "${probe_first[3]}") ($(pr "${probe_first[4]}"), $(pr "${probe_first[5]}")) / $(pr "${probe_recorded[3]}") ($(pr "${probe_recorded[4]}"), $(pr "${probe_recorded[5]}")) / $(pr "${probe_warm[3]}") ($(pr "${probe_warm[4]}"), $(pr "${probe_warm[5]}")) | $(pr "${probe_native[3]}") | | | 2 cores: what the store and a fetch ahead cost runs beside the start |"
    fi
  fi
  if [ -n "$others" ]; then
    echo "| find + cat 5,000 × 4 KiB cold (s) | $(fmt "$cold_small" 3) | $(fmt "$native_small" 3) | $(fmt "$rclone_small_cold" 2) | $(fmt "$s3fs_small_cold" 2) | $(fmt "$(ratio "$cold_small" "$s3fs_small_cold")")× s3fs time |"
    echo "| find + cat 5,000 × 4 KiB warm (s) | $(fmt "$warm_small" 3) | $(fmt "$native_small" 3) | $(fmt "$rclone_small_warm" 2) | $(fmt "$s3fs_small_warm" 2) | $(fmt "$(ratio "$warm_small" "$native_small")")× native time |"
  else
    echo "| find + cat 5,000 × 4 KiB cold / warm (s) | $(fmt "$cold_small" 3) / $(fmt "$warm_small" 3) | $(fmt "$native_small" 3) | | | warm $(fmt "$(ratio "$warm_small" "$native_small")")× native time |"
  fi
  echo "| find + cat 5,000 × 4 KiB hot (page cache kept), scratch / read-only mount (s) | $(fmt "$hot_small" 3) / $(fmt "$hot_small_ro" 3) | $(fmt "$native_hot_small" 3) | | | $(fmt "$(ratio "$hot_small" "$native_hot_small")")× / $(fmt "$(ratio "$hot_small_ro" "$native_hot_small")")× native time |"
  setting_rows hp_ "with guest halt-polling on (200 µs; this VM boots with it off)" "with guest halt-polling on"
  setting_rows wh_ "with the fuse module's wake_here on (this VM boots with it off; halt-polling as booted)" "with wake_here on"
  echo "| fan-out: 8 mounts read 1 GiB cold: store bytes / wall (s) | $(fmt "$(ratio "$fan_store" $((1 << 30)))")× the file / $(fmt "$fan_secs" 2) | | | | wall $(fmt "$(ratio "$fan_secs" "$(ratio 1024 "$cold_seq")")")× one reader |"
  echo "| fan-out, read-only: 8 mounts (one shared session) read 1 GiB cold: store bytes / wall (s) | $(fmt "$(ratio "$rofan_store" $((1 << 30)))")× the file / $(fmt "$rofan_secs" 2) | | | | wall $(fmt "$(ratio "$rofan_secs" "$(ratio 1024 "$cold_seq")")")× one reader |"
  echo "| write a new 1 GiB file, fsync'ed (MiB/s) | $(fmt "$st_write" 0) | $(fmt "$native_write" 0) | | | $(fmt "$(ratio "$st_write" "$native_write")")× native |"
  echo "| copy-up of the 1 GiB layer file: first 4 KiB write (ms) | $(fmt "$st_first_ms" 2) | $(fmt "$native_first_ms" 2) | | | |"
  echo "| copy-up of the 1 GiB layer file: a 4 KiB write into each MiB, fsync'ed (s) | $(fmt "$st_copyup_s" 2) | $(fmt "$native_copyup_s" 2) | | | $(fmt "$(ratio "$st_copyup_s" "$native_copyup_s")")× native time |"
  echo "| daemon peak RSS (MiB; memory cache 256 MiB) | $((PEAK_RSS_KB / 1024)) | | | | |"
} | tee "$out"
echo "saved $out"
