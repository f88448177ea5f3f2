# shellcheck shell=bash
# The kernel's FUSE tracepoints (fuse_request_send / fuse_request_end, Linux 6.14 and later):
# how many requests a command made to one FUSE mount and how long they took, summed (sourced by
# the bench scripts; root). fuse_trace_ready mounts tracefs if it is not and says whether the
# tracepoints are there; fuse_trace_restore puts back what the others changed.

FUSE_TRACE=/sys/kernel/tracing
FUSE_TRACE_MOUNTED=
FUSE_TRACE_BUFFER=
FUSE_TRACE_WAS_ON=
FUSE_TRACE_EVENTS_WERE=

fuse_trace_ready() {
  if ! mountpoint -q "$FUSE_TRACE"; then
    mount -t tracefs nodev "$FUSE_TRACE" 2>/dev/null || return 1
    FUSE_TRACE_MOUNTED=1
  fi
  [ -d "$FUSE_TRACE/events/fuse" ]
}

fuse_trace_on() {
  if [ -z "$FUSE_TRACE_BUFFER" ]; then
    FUSE_TRACE_BUFFER=$(cat "$FUSE_TRACE/buffer_size_kb")
    FUSE_TRACE_WAS_ON=$(cat "$FUSE_TRACE/tracing_on")
    FUSE_TRACE_EVENTS_WERE=$(cat "$FUSE_TRACE/events/fuse/enable")
  fi
  echo 0 > "$FUSE_TRACE/tracing_on"
  echo > "$FUSE_TRACE/trace"
  echo 32768 > "$FUSE_TRACE/buffer_size_kb"
  echo 1 > "$FUSE_TRACE/events/fuse/enable"
  echo 1 > "$FUSE_TRACE/tracing_on"
}

# fuse_trace_off DIR: stops tracing; prints "requests milliseconds" over the requests to the
# mount at DIR (none if it is no FUSE mount) that a caller may wait on: all but releases, which
# the kernel sends without waiting, and forgets, which have no answer. Says so on stderr if the
# buffer overflowed (the figures are then low).
fuse_trace_off() {
  local dev conn=none
  echo 0 > "$FUSE_TRACE/tracing_on"
  echo 0 > "$FUSE_TRACE/events/fuse/enable"
  # The kernel's encoding of the mount's device number (major << 20 | minor).
  if dev=$(mountpoint -d "$1" 2>/dev/null) && [[ $dev =~ ^[0-9]+:[0-9]+$ ]]; then
    conn=$(( (${dev%%:*} << 20) | ${dev##*:} ))
  fi
  python3 - "$FUSE_TRACE/trace" "$conn" <<'PY'
import re, sys
line_re = re.compile(r"\s(\d+\.\d+): fuse_request_(send|end): connection (\d+) req (\d+)(?: opcode \d+ \((\w+)\))?")
sent, n, total = {}, 0, 0.0
for line in open(sys.argv[1]):
    if "LOST" in line and "EVENTS" in line:
        print("fuse trace: events lost; the figures are low", file=sys.stderr)
    m = line_re.search(line)
    if not m or m.group(3) != sys.argv[2]:
        continue
    t, kind, _, req, op = m.groups()
    if kind == "send":
        sent[req] = (float(t), op)
    elif req in sent:
        start, op = sent.pop(req)
        if op not in ("FUSE_RELEASE", "FUSE_RELEASEDIR", "FUSE_FORGET", "FUSE_BATCH_FORGET", "FUSE_INTERRUPT"):
            n += 1
            total += float(t) - start
print(n, "%.1f" % (total * 1e3))
PY
  echo > "$FUSE_TRACE/trace"
}

fuse_trace_restore() {
  if [ -n "$FUSE_TRACE_BUFFER" ]; then
    echo "${FUSE_TRACE_EVENTS_WERE:-0}" > "$FUSE_TRACE/events/fuse/enable" 2>/dev/null || true
    echo > "$FUSE_TRACE/trace" 2>/dev/null || true
    echo "$FUSE_TRACE_BUFFER" > "$FUSE_TRACE/buffer_size_kb" 2>/dev/null || true
    echo "$FUSE_TRACE_WAS_ON" > "$FUSE_TRACE/tracing_on" 2>/dev/null || true
  fi
  [ -z "$FUSE_TRACE_MOUNTED" ] || umount "$FUSE_TRACE" 2>/dev/null || true
  return 0
}
