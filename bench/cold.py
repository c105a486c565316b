"""Cold-tier benchmark driver (bench/cold.sh starts the nodes).

Phases, each printed as one line of figures:
  1. baseline: p50/p99 of 4 KiB GETs of a hot object (foreground) for a few seconds;
  2. transition: a lifecycle rule makes N objects cold; measures the time until every
     one reports the cold storage class (MiB/s) while the foreground GETs run, and
     their p99 during the moves;
  3. reads: GET MiB/s and time to first byte of the cold objects against the same
     number of hot objects of the same size.
"""
import os
import statistics
import sys
import threading
import time

import boto3
from botocore.config import Config

endpoint, ak, sk, label = sys.argv[1:5]
size = int(os.environ.get("COLD_BENCH_SIZE", str(64 << 20)))
count = int(os.environ.get("COLD_BENCH_OBJECTS", "8"))
s3 = boto3.client(
    "s3",
    endpoint_url=endpoint,
    aws_access_key_id=ak,
    aws_secret_access_key=sk,
    region_name="us-east-1",
    config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                  max_pool_connections=16),
)
bucket = "coldbench"
s3.create_bucket(Bucket=bucket)
body = os.urandom(size)
small = os.urandom(4096)
s3.put_object(Bucket=bucket, Key="fg/small", Body=small)
for i in range(count):
    s3.put_object(Bucket=bucket, Key=f"cold/{i}", Body=body)
    s3.put_object(Bucket=bucket, Key=f"hot/{i}", Body=body)


def foreground(stop, lat):
    while not stop.is_set():
        t = time.perf_counter()
        s3.get_object(Bucket=bucket, Key="fg/small")["Body"].read()
        lat.append(time.perf_counter() - t)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000 if xs else float("nan")


stop, base = threading.Event(), []
th = threading.Thread(target=foreground, args=(stop, base))
th.start()
time.sleep(5)
stop.set()
th.join()

stop, during = threading.Event(), []
th = threading.Thread(target=foreground, args=(stop, during))
th.start()
t0 = time.perf_counter()
s3.put_bucket_lifecycle_configuration(
    Bucket=bucket,
    LifecycleConfiguration={"Rules": [{
        "ID": "bench", "Status": "Enabled", "Filter": {"Prefix": "cold/"},
        "Transitions": [{"Days": 0, "StorageClass": "GLACIER"}]}]},
)
pending = set(range(count))
while pending:
    for i in list(pending):
        if s3.head_object(Bucket=bucket, Key=f"cold/{i}").get("StorageClass") == "GLACIER_IR":
            pending.discard(i)
    if time.perf_counter() - t0 > 600:
        sys.exit("objects did not move within 600 s")
    time.sleep(0.1)
moved = time.perf_counter() - t0
stop.set()
th.join()
mib = size * count / (1 << 20)
print(f"{label}: transition of {count} x {size >> 20} MiB: {mib / moved:.1f} MiB/s "
      f"({moved:.1f} s, includes the wait for the mover's next pass); foreground 4 KiB GET "
      f"p50 {pct(base, .5):.2f} -> {pct(during, .5):.2f} ms, p99 {pct(base, .99):.2f} -> "
      f"{pct(during, .99):.2f} ms ({pct(during, .99) / pct(base, .99):.2f}x)")


def reads(prefix):
    ttfb, total = [], 0.0
    for i in range(count):
        t = time.perf_counter()
        r = s3.get_object(Bucket=bucket, Key=f"{prefix}/{i}")["Body"]
        first = r.read(1)
        ttfb.append(time.perf_counter() - t)
        rest = r.read()
        total += time.perf_counter() - t
        assert len(first) + len(rest) == size
    return mib / total, statistics.median(ttfb) * 1000


for _ in range(2):  # first round warms the page cache for both
    hot = reads("hot")
    cold = reads("cold")
print(f"{label}: GET {size >> 20} MiB: hot {hot[0]:.0f} MiB/s, first byte {hot[1]:.1f} ms; "
      f"cold {cold[0]:.0f} MiB/s, first byte {cold[1]:.1f} ms "
      f"(cold/hot throughput {cold[0] / hot[0]:.2f}x)")
