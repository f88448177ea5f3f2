# shellcheck shell=bash
# The strata daemon, the other processes a benchmark starts, and its cleanup (sourced by the
# bench scripts, after measure.sh).
#
# bench_init WORK first. Every process the script starts in the background is recorded with
# bench_track_pid in WORK/bench-pids, as its pid, its start time and the shell that started it,
# so that bench_cleanup ends those and no others, even those started in a subshell (a
# pipeline, say) that the exiting shell cannot wait for; a recorded pid whose start time no
# longer matches is someone else's process now and is left alone.
#
# The daemon: DAEMON_BIN (the strata binary, required), DAEMON_CACHE (its --cache-dir, default
# WORK/cache), DAEMON_STATE (its --state-dir; none by default, so the daemon's own default),
# DAEMON_LOG (appended to; default WORK/daemon.log). STRATA_SOCKET is the caller's to export.
# DAEMON_COLD_DROP_CACHES=1 makes daemon_cold drop the page cache before the new daemon starts.
# DAEMON_PID is the running daemon's pid, empty when there is none; PEAK_RSS_KB the highest
# VmHWM that daemon_stop saw.

DAEMON_PID=
PEAK_RSS_KB=0

bench_init() { # work dir
  BENCH_WORK=$1
  BENCH_PIDS=$1/bench-pids
  : > "$BENCH_PIDS"
}

# "state start-time" of a process (fields 3 and 22 of /proc/PID/stat, read after the command
# name, which may hold spaces and parentheses), or nothing once it is gone.
_bench_stat() { { sed -n 's/^.*) //p' "/proc/$1/stat" 2>/dev/null || true; } | awk '{print $1, $20}'; }

_bench_alive() { # pid start: still running (not a zombie), and still the process recorded
  local st
  st=$(_bench_stat "$1")
  [ -n "$st" ] && [ "${st#* }" = "$2" ] && [ "${st%% *}" != Z ]
}

_bench_entry() { # pid → "start owner" as recorded, or nothing
  awk -v p="$1" '$1 == p {print $2, $3; exit}' "$BENCH_PIDS"
}

_bench_untrack() {
  awk -v p="$1" '$1 != p' "$BENCH_PIDS" > "$BENCH_PIDS.new" && mv "$BENCH_PIDS.new" "$BENCH_PIDS"
}

# TERM a recorded process. The shell that started it waits for it (as long as it takes); any
# other shell gives it 30 s, then KILLs it.
_bench_end() { # pid start owner
  if _bench_alive "$1" "$2"; then
    kill -TERM "$1" 2>/dev/null || true
    if [ "$3" != "$BASHPID" ]; then
      for _ in $(seq 1 300); do _bench_alive "$1" "$2" || break; sleep 0.1; done
      if _bench_alive "$1" "$2"; then
        echo "pid $1 still running 30 s after TERM; killing it" >&2
        kill -KILL "$1" 2>/dev/null || true
      fi
    fi
  fi
  if [ "$3" = "$BASHPID" ]; then wait "$1" 2>/dev/null || true; fi
  return 0
}

bench_track_pid() { # pid: a process this script started, for bench_stop_pid and bench_cleanup
  local st start
  st=$(_bench_stat "$1")
  start=${st#* }
  echo "$1 ${start:-gone} $BASHPID" >> "$BENCH_PIDS"
}

bench_running() { # pid: a recorded process, still running
  local e
  e=$(_bench_entry "$1")
  [ -n "$e" ] && _bench_alive "$1" "${e% *}"
}

bench_stop_pid() { # pid: TERM a recorded process, wait for it to exit, and forget it
  local e
  e=$(_bench_entry "$1")
  if [ -z "$e" ]; then echo "bench_stop_pid: $1 is not a process this script recorded" >&2; return 0; fi
  # shellcheck disable=SC2086  # "start owner", two words
  _bench_end "$1" $e
  _bench_untrack "$1"
}

bench_wait_mount() { # dir pid log: until dir is mounted; fails if pid, which mounts it, exits first
  until grep -qs " $1 " /proc/mounts; do
    if ! bench_running "$2"; then
      echo "pid $2 exited before $1 was mounted; the end of $3:" >&2
      tail -n 20 "$3" >&2
      return 1
    fi
    sleep 0.05
  done
}

# Unmounts everything under WORK (deepest first) and ends every recorded process still running.
bench_cleanup() {
  [ -n "${BENCH_WORK:-}" ] || return 0
  local mp pid start owner
  while read -r mp; do
    umount -l "$mp" 2>/dev/null || true
  done < <(awk -v w="$BENCH_WORK" '$2 == w || index($2, w "/") == 1 {print $2}' /proc/mounts | sort -r)
  if [ -f "$BENCH_PIDS" ]; then
    while read -r pid start owner; do _bench_end "$pid" "$start" "$owner"; done < "$BENCH_PIDS"
    : > "$BENCH_PIDS"
  fi
  DAEMON_PID=
}

daemon_start() { # extra daemon flags: a daemon, once `strata mounts` answers
  local bin=${DAEMON_BIN:?DAEMON_BIN: the strata binary} log=${DAEMON_LOG:-$BENCH_WORK/daemon.log}
  local state=()
  [ -z "${DAEMON_STATE:-}" ] || state=(--state-dir "$DAEMON_STATE")
  "$bin" daemon --cache-dir "${DAEMON_CACHE:-$BENCH_WORK/cache}" "${state[@]}" "$@" >> "$log" 2>&1 &
  DAEMON_PID=$!
  bench_track_pid "$DAEMON_PID"
  until "$bin" mounts >/dev/null 2>&1; do
    if ! bench_running "$DAEMON_PID"; then
      echo "the strata daemon exited at start; the end of $log:" >&2
      tail -n 20 "$log" >&2
      return 1
    fi
    sleep 0.05
  done
}

daemon_rss() { # PEAK_RSS_KB = the daemon's VmHWM, if higher
  local hwm
  bench_running "$DAEMON_PID" || return 0
  hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$DAEMON_PID/status" 2>/dev/null || true)
  [ "${hwm:-0}" -gt "$PEAK_RSS_KB" ] && PEAK_RSS_KB=$hwm
  return 0
}

daemon_stop() { # samples its RSS, TERMs it and waits for it; nothing without a daemon
  [ -n "$DAEMON_PID" ] || return 0
  daemon_rss
  bench_stop_pid "$DAEMON_PID"
  DAEMON_PID=
}

# A fresh daemon with an empty cache (extra daemon flags).
daemon_cold() {
  daemon_stop
  rm -rf "${DAEMON_CACHE:-$BENCH_WORK/cache}"
  [ -z "${DAEMON_COLD_DROP_CACHES:-}" ] || drop_caches
  daemon_start "$@"
}
