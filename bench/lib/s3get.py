"""The raw download baseline: GET an object with N parallel ranged GETs, as fast as the server
allows, and print MiB/s. Bytes are read and dropped, nothing is written.

usage: s3get.py BUCKET KEY [PARALLEL] [PART_MIB]
Endpoint and credentials come from AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
With S3GET_BUSY_FILE set, also writes there the CPU-seconds the whole machine was busy during
the transfer (every process and the kernel) and the transfer's seconds.
"""

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config


def machine_busy():
    """CPU-seconds the whole machine has been busy (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8)) / os.sysconf("SC_CLK_TCK")


def main():
    bucket, key = sys.argv[1], sys.argv[2]
    parallel = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    part = (int(sys.argv[4]) if len(sys.argv) > 4 else 8) << 20
    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
        region_name=os.environ.get("AWS_REGION", "garage"),
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=parallel * 2),
    )
    size = s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    ranges = [(off, min(off + part, size) - 1) for off in range(0, size, part)]

    def fetch(r):
        body = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={r[0]}-{r[1]}")["Body"]
        n = 0
        while True:
            b = body.read(1 << 20)
            if not b:
                return n
            n += len(b)

    busy0, t0 = machine_busy(), time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        got = sum(pool.map(fetch, ranges))
    secs = time.monotonic() - t0
    if os.environ.get("S3GET_BUSY_FILE"):
        with open(os.environ["S3GET_BUSY_FILE"], "w") as f:
            f.write(f"{machine_busy() - busy0:.2f} {secs:.3f}\n")
    if got != size:
        sys.exit(f"got {got} bytes of {size}")
    print(f"{size / secs / (1 << 20):.1f}")


if __name__ == "__main__":
    main()
