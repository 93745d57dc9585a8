"""Fetching a model directory from a slow object store: one transfer at a time against parallel ones (prints numbers).

    python benchmarks/fetch.py                                  # 50 ms per request, 100 MB/s per stream, 16 threads
    python benchmarks/fetch.py --latency 0.03 --stream-mbps 200 --threads 32

The store is the tests' fake gs:// store (``tests/test_locations.py``: a local directory listed and read as gcsfs
does, with ranged reads) made slow: every request (list, stat, open, ranged read) waits ``--latency`` seconds, and
a read also its bytes at ``--stream-mbps`` (a per-connection limit, as a bucket's). Each variant is fetched into an
empty mirror by ``jaxunlearn.storage.locations.mirror`` with 1 thread (serial, as before issue 28) and with
``--threads``, then checked again with nothing changed (the stats only). Large files are split into ``--chunk-mb``
ranges: 16 MiB by default so that 2 x 256 MiB here are cut into as many ranges per file (16) as 1 GiB with the
real default of 64 MiB; the local copy of the bytes (this machine's disk and memory) is real, not modelled.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from etils import epath

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jaxunlearn.storage import locations  # noqa: E402
from tests.test_locations import slow_store  # noqa: E402


def write_files(root: Path, count: int, size: int) -> int:
    """``count`` files of ``size`` random bytes (one random block repeated: fast to write); returns the bytes."""
    root.mkdir(parents=True)
    block = os.urandom(min(size, 1 << 20))
    for i in range(count):
        with open(root / f"model-{i + 1:05d}-of-{count:05d}.safetensors", "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
            f.write(block[: size % len(block)])
    return count * size


def timed(url: epath.Path, local: Path, threads: int, chunk: int) -> tuple[float, float]:
    """Seconds to fetch ``url`` into an empty mirror, then to find it up to date."""
    start = time.perf_counter()
    done = locations.mirror(url, local, threads=threads, chunk_size=chunk)
    first = time.perf_counter() - start
    assert done.files == len(done.copied)
    start = time.perf_counter()
    again = locations.mirror(url, local, threads=threads, chunk_size=chunk)
    assert not again.copied
    return first, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=float, default=0.05, help="seconds per request")
    p.add_argument("--stream-mbps", type=float, default=100.0, help="MB/s of one request's bytes")
    p.add_argument("--threads", type=int, default=locations.DEFAULT_THREADS)
    p.add_argument("--files", type=int, default=32, help="files of the many-files variant")
    p.add_argument("--file-mb", type=float, default=2.0)
    p.add_argument("--large-files", type=int, default=2, help="files of the large-files variant")
    p.add_argument("--large-mb", type=float, default=256.0)
    p.add_argument("--chunk-mb", type=float, default=16.0, help="range size of a large file's parallel reads")
    args = p.parse_args()
    chunk = int(args.chunk_mb * 2**20)
    variants = {
        f"{args.files} files x {args.file_mb:g} MiB": (args.files, int(args.file_mb * 2**20)),
        f"{args.large_files} files x {args.large_mb:g} MiB": (args.large_files, int(args.large_mb * 2**20)),
    }
    print(
        f"store: {args.latency * 1000:g} ms per request, {args.stream_mbps:g} MB/s per stream; "
        f"ranges of {args.chunk_mb:g} MiB; parallel = {args.threads} threads"
    )
    print(
        f"{'variant':<22} {'MB':>6} {'serial s':>9} {'parallel s':>11} {'speed-up':>9} {'peak':>5} "
        f"{'no-store s':>11} {'check s (serial/par.)':>22}"
    )
    with tempfile.TemporaryDirectory() as tmp, slow_store(Path(tmp) / "gcs") as store:
        for name, (count, size) in variants.items():
            folder = name.replace(" ", "")
            total = write_files(Path(tmp) / "gcs" / "bucket" / folder, count, size)
            url = epath.Path(f"gs://bucket/{folder}")
            store.reset(store.root, args.latency, args.stream_mbps * 1e6)
            serial = timed(url, Path(tmp) / "serial" / folder, 1, chunk)
            parallel = timed(url, Path(tmp) / "parallel" / folder, args.threads, chunk)
            peak = store.max_in_flight
            store.reset(store.root)  # no latency, no bandwidth limit: what this machine's own copying costs
            floor = timed(url, Path(tmp) / "floor" / folder, args.threads, chunk)
            print(
                f"{name:<22} {total / 1e6:>6.0f} {serial[0]:>9.2f} {parallel[0]:>11.2f} "
                f"{serial[0] / parallel[0]:>8.1f}x {peak:>5} {floor[0]:>11.2f} {serial[1]:>12.2f} / {parallel[1]:.2f}"
            )
    print(
        "peak: requests in flight at most; no-store: the parallel fetch from a store without latency or bandwidth "
        "limit (this machine's disk and memory); check: the same fetch again, nothing changed"
    )


if __name__ == "__main__":
    main()
