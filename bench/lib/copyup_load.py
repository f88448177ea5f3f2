"""Read latency of one file while writers copy other files up (bench/copyup.sh).

    copyup_load.py HOT SECONDS WRITER_FILE...

Reads 4 KiB at random offsets of HOT with O_DIRECT (every read reaches the filesystem, not
the page cache), first alone for SECONDS, then while one process per WRITER_FILE writes one
byte into each 256 KiB block of its file in random order (each such write copies a block up
from the layers, fetching its chunk from the store when it is not cached), until the writers
are done (at most SECONDS). Prints one line per phase:
"phase reads p50_us p99_us max_us blocks_copied_up seconds".
"""
import mmap
import multiprocessing as mp
import os
import random
import sys
import time

BLOCK = 256 << 10


def reader(path, seconds, stop=None):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    size = os.fstat(fd).st_size
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    rng = random.Random(1)
    lat = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (stop and stop.is_set()):
        off = rng.randrange(size // 4096) * 4096
        t = time.perf_counter_ns()
        os.preadv(fd, [buf], off)
        lat.append((time.perf_counter_ns() - t) / 1000)
    os.close(fd)
    return lat


def writer(path, seed, done, stop):
    fd = os.open(path, os.O_WRONLY)
    size = os.fstat(fd).st_size
    order = list(range(size // BLOCK))
    random.Random(seed).shuffle(order)
    for b in order:
        if stop.is_set():
            break
        os.pwrite(fd, b"x", b * BLOCK + 1)  # inside the block: it must be copied up first
        with done.get_lock():
            done.value += 1
    os.close(fd)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def report(phase, lat, writes, seconds):
    print(f"{phase} {len(lat)} {pct(lat, 0.5):.0f} {pct(lat, 0.99):.0f} {max(lat):.0f} {writes} "
          f"{seconds:.1f}", flush=True)


def main():
    hot, seconds, files = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    report("alone", reader(hot, seconds), 0, seconds)
    done, stop, finished = mp.Value("l", 0), mp.Event(), mp.Event()
    procs = [mp.Process(target=writer, args=(f, i, done, stop)) for i, f in enumerate(files)]
    start = time.monotonic()
    for p in procs:
        p.start()

    def watch():
        for p in procs:
            p.join()
        finished.set()

    import threading
    threading.Thread(target=watch, daemon=True).start()
    time.sleep(0.2)  # writers opened and under way
    lat = reader(hot, seconds, finished)
    writes = done.value
    stop.set()
    for p in procs:
        p.join()
    report("writers", lat, writes, time.monotonic() - start)


if __name__ == "__main__":
    main()
