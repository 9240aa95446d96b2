"""`batchgen status OUT --json` over a job of many ranks caught mid-run: every rank has COMMITS
commit records that no manifest generation has folded in yet (a run folds them in at its end),
so status reads what a rank's running state is made of (#22: under 1 s at 1,000 ranks).

    PYTHONPATH=. python jobs/tools/status_midrun_bench.py --ranks 1000 --commits 100 \\
        --output /tmp/midrun

Rank 0 is built through the commit path itself (`Checkpoint.open`, the generation a run writes
at its start, then `ParquetShardWriter.write` and `Checkpoint.commit` per shard); the other ranks
are copies of its state files under their own names (shards hard-linked), so the folder is
what that batchgen writes, made in seconds rather than with 100,000 fsyncs. It uses the
`pipeline` that PYTHONPATH points at: to compare two checkouts, build and time with each.

Timed, each as a process with its CPU time: status while this script holds every rank's lock
(the ranks are running: status reads their state, not their shard folders), then with the
locks free (crashed: it also lists each rank's shard folder to find unlisted shards). With
--finished every rank ends instead (its records folded into one generation of COMMITS shards);
"running" is then moot and "crashed" is a finished job's status.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

from pipeline.checkpoint import Checkpoint, RankLock, manifest_path
from pipeline.fingerprint import fingerprint_digest
from pipeline.records import ResultRow
from pipeline.sinks import ParquetShardWriter, output_schema, rank_dir

ROWS_PER_SHARD = 10


def build(out: Path, ranks: int, commits: int, finished: bool) -> None:
    """Rank 0 through the commit path (and its end, if `finished`: the generation that folds
    its records in), then the other ranks as renamed copies of it."""
    fingerprint = {"bench": "status mid-run", "num_shards": ranks}
    lock = RankLock(out, 0).acquire()
    checkpoint = Checkpoint(out, 0, ranks)
    checkpoint.open(fingerprint, commits * ROWS_PER_SHARD * 2, overwrite=False)
    checkpoint.set_status("running")
    meta = {"fingerprint_sha256": fingerprint_digest(fingerprint)}
    writer = ParquetShardWriter(out, 0, output_schema(False, []), meta)
    started = time.time()
    for seq in range(commits):
        first = seq * ROWS_PER_SHARD
        rows = [
            ResultRow(f"p{i}", i, 0, "text", "length", 20, 8)
            for i in range(first, first + ROWS_PER_SHARD)
        ]
        info = writer.write(rows, seq)
        info.committed_at = round(time.time(), 3)
        info.generate_seconds = round(time.time() - started, 3)
        checkpoint.commit(info)
    if finished:
        checkpoint.set_status("finished", {"this_run": {"prompts": commits * ROWS_PER_SHARD}})
    lock.release()
    state0, shards0 = manifest_path(out, 0), rank_dir(out, 0)
    for rank in range(1, ranks):
        _copy_rank(state0, shards0, manifest_path(out, rank), rank_dir(out, rank), rank)


def _copy_rank(state0: Path, shards0: Path, state: Path, shards: Path, rank: int) -> None:
    """Rank 0's files as rank `rank`'s: its rank and shard names in every JSON state file."""
    state.mkdir(parents=True)
    shards.mkdir(parents=True)
    old, new = "part-00000-", f"part-{rank:05d}-"
    for path in state0.iterdir():
        if path.suffix != ".json":
            continue
        data = json.loads(path.read_text().replace(old, new))
        if "rank" in data:
            data["rank"] = rank
        totals = data.get("totals")  # (a batchgen with totals) their digest of the names
        if totals is not None:
            names = (f"{new}{seq:06d}.parquet" for seq in range(totals["shards"]))
            totals["names_crc"] = sum(zlib.crc32(name.encode()) for name in names)
        (state / path.name).write_text(json.dumps(data, indent=1, sort_keys=True))
    for path in shards0.iterdir():
        os.link(path, shards / path.name.replace(old, new))


def check_status(out: Path) -> dict[str, object]:
    """What `batchgen status OUT --json` counts over all ranks (a check the build is whole)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "status", str(out), "--json"],
        capture_output=True,
        text=True,
    )
    if proc.returncode not in (0, 3):
        sys.exit(f"status failed ({proc.returncode}): {proc.stderr[-400:]}")
    total = json.loads(proc.stdout)["all"]
    return {k: total[k] for k in ("states", "shards", "rows", "prompts")}


def time_status(out: Path) -> dict[str, float]:
    """`python -m pipeline status OUT --json` as a process: its wall and CPU seconds (user +
    system, from wait4), Python's start and imports included."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "status", str(out), "--json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _pid, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 3):
        sys.exit(f"status exited {code}")
    return {
        "wall_seconds": round(time.monotonic() - started, 3),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=1000)
    parser.add_argument("--commits", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=1, help="timed runs of each status")
    parser.add_argument(
        "--finished", action="store_true", help="end every rank instead (records folded in)"
    )
    parser.add_argument("--output", type=Path, required=True, help="a folder to build the job in")
    args = parser.parse_args()
    out = args.output / "out"
    if out.exists():
        shutil.rmtree(out)
    import pipeline

    load = {"start": os.getloadavg()}
    t = time.monotonic()
    build(out, args.ranks, args.commits, args.finished)
    built = round(time.monotonic() - t, 1)
    checked = check_status(out)  # also warms the page cache for the timed runs
    locks = [RankLock(out, rank).acquire() for rank in range(args.ranks)]
    running = [time_status(out) for _ in range(args.repeat)]
    for lock in locks:
        lock.release()
    crashed = [time_status(out) for _ in range(args.repeat)]
    load["end"] = os.getloadavg()
    print(
        json.dumps(
            {
                "pipeline": str(Path(pipeline.__file__).parent),
                "ranks": args.ranks,
                "commits_per_rank": args.commits,
                "finished": args.finished,
                "build_seconds": built,
                "status": checked,
                "running": running,
                "crashed": crashed,
                "load_average": load,
                "cpus": os.cpu_count(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
