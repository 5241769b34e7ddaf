"""Upload throughput of serving.s3.S3Storage against boto3's own upload_file (not a test).

Starts ``rclone serve s3`` on loopback (see tests/support/s3.py), then for each size uploads the
same bytes with boto3's ``upload_file`` (its default TransferConfig: 8 MiB parts, 10 threads) and
through ``S3Storage.put`` (sha256 pass, multipart with BUCKET_PART_SIZE_MB and
BUCKET_UPLOAD_CONCURRENCY, HEAD check, presign), alternating, and prints MB/s and the ratio of
medians. ``--sweep`` also tries a few part sizes and concurrencies. Temporary files and the
server's directory are removed as it goes.

    .venv/bin/python bench/upload_bench.py                 # 100 MB and 1 GB, ~1 min on loopback
    .venv/bin/python bench/upload_bench.py --sizes 100 --sweep
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import boto3
import botocore.config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a script, not a test

from serving.config import StorageSettings  # noqa: E402
from serving.s3 import S3Storage  # noqa: E402
from tests.support.s3 import S3Server, free_port  # noqa: E402


def write_file(path: Path, size: int) -> None:
    block = os.urandom(16 * 1024 * 1024)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,1000", help="sizes in MB (10^6 bytes)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--sweep", action="store_true", help="also try part sizes/concurrency")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="upload-bench-"))
    server = S3Server(root=work / "s3", port=free_port())
    server.root.mkdir()
    server.start()
    try:
        bucket = server.make_bucket("bench")
        client = boto3.client(
            "s3", endpoint_url=server.endpoint, region_name="us-east-1",
            aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
            config=botocore.config.Config(request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"))
        base_env = server.env(bucket, BUCKET_TIMEOUT_SECONDS="300")
        variants: list[tuple[str, dict[str, str]]] = [("ours (defaults)", {})]
        if args.sweep:
            variants += [(f"ours part={p}MiB conc={c}", {"BUCKET_PART_SIZE_MB": str(p),
                                                         "BUCKET_UPLOAD_CONCURRENCY": str(c)})
                         for p, c in [(8, 10), (8, 4), (16, 4), (32, 4), (64, 4), (64, 8)]]
        for mb in (int(s) for s in args.sizes.split(",")):
            size = mb * 1_000_000
            src = work / f"answer-{mb}MB.bin"
            write_file(src, size)
            t_hash = timed(lambda s=src: hashlib.sha256(s.read_bytes()).hexdigest()) \
                if mb <= 200 else float("nan")
            results: dict[str, list[float]] = {"boto3 upload_file": []}
            for name, _ in variants:
                results[name] = []
            for i in range(args.repeat):
                results["boto3 upload_file"].append(
                    timed(lambda s=src, k=f"boto3/{i}": client.upload_file(str(s), bucket, k)))
                client.delete_object(Bucket=bucket, Key=f"boto3/{i}")
                for name, extra in variants:
                    storage = S3Storage.from_settings(StorageSettings.from_env({**base_env,
                                                                                **extra}))
                    key = f"ours/{i}"
                    results[name].append(timed(lambda s=storage, k=key, f=src: s.put(
                        k, f, "application/octet-stream")))
                    client.delete_object(Bucket=bucket, Key=key)
            base = statistics.median(results["boto3 upload_file"])
            print(f"\n{mb} MB (sha256 of it in memory: {t_hash:.2f} s)")
            for name, times in results.items():
                med = statistics.median(times)
                print(f"  {name:28s} {size / med / 1e6:8.1f} MB/s  median {med:6.2f} s  "
                      f"ratio to boto3 {base / med:5.2f}")
            src.unlink()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
