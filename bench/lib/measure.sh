# Helpers the benchmarks share for timing and printing figures (source it).
now() { date +%s.%N; }
# Runs a command with its output dropped; prints the seconds it took.
timed() { local a b; a=$(now); "$@" > /dev/null; b=$(now); echo "$b - $a" | bc -l; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
fmt() { printf '%.*f' "${2:-2}" "$1"; }
ratio() { echo "$1 / $2" | bc -l; }
mibs() { echo "$1 / $2" | bc -l; }  # MiB, seconds
max() { printf '%s\n' "$@" | sort -g | tail -1; }
min() { printf '%s\n' "$@" | sort -g | head -1; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
