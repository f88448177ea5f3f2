# shellcheck shell=bash
# The kernel's FUSE tracepoints (fuse_request_send / fuse_request_end, Linux 6.14 and later):
# how many requests a command made to FUSE filesystems and how long they took, summed (sourced
# by the bench scripts; root). fuse_trace_ready mounts tracefs if it is not and says whether
# the tracepoints are there.

FUSE_TRACE=/sys/kernel/tracing

fuse_trace_ready() {
  [ -d "$FUSE_TRACE/events/fuse" ] && return 0
  mountpoint -q "$FUSE_TRACE" || mount -t tracefs nodev "$FUSE_TRACE" 2>/dev/null || return 1
  [ -d "$FUSE_TRACE/events/fuse" ]
}

fuse_trace_on() {
  echo 0 > "$FUSE_TRACE/tracing_on"
  echo > "$FUSE_TRACE/trace"
  echo 32768 > "$FUSE_TRACE/buffer_size_kb"
  echo 1 > "$FUSE_TRACE/events/fuse/enable"
  echo 1 > "$FUSE_TRACE/tracing_on"
}

# Stops tracing; prints "requests milliseconds" over the requests a caller may wait on (all
# but releases, which the kernel sends without waiting, and forgets, which have no answer),
# and a note on stderr if the buffer overflowed (the figures are then low).
fuse_trace_off() {
  echo 0 > "$FUSE_TRACE/tracing_on"
  echo 0 > "$FUSE_TRACE/events/fuse/enable"
  python3 - "$FUSE_TRACE/trace" <<'PY'
import re, sys
line_re = re.compile(r"\s(\d+\.\d+): fuse_request_(send|end): connection (\d+) req (\d+)(?: opcode \d+ \((\w+)\))?")
sent, n, total = {}, 0, 0.0
for line in open(sys.argv[1]):
    if "LOST" in line and "EVENTS" in line:
        print("fuse trace: events lost; the figures are low", file=sys.stderr)
    m = line_re.search(line)
    if not m:
        continue
    t, kind, conn, req, op = m.groups()
    if kind == "send":
        sent[(conn, req)] = (float(t), op)
    elif (conn, req) in sent:
        start, op = sent.pop((conn, req))
        if op not in ("FUSE_RELEASE", "FUSE_RELEASEDIR", "FUSE_FORGET", "FUSE_BATCH_FORGET", "FUSE_INTERRUPT"):
            n += 1
            total += float(t) - start
print(n, "%.1f" % (total * 1e3))
PY
  echo > "$FUSE_TRACE/trace"
}
