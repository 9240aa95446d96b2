"""`batchgen bench --reuse-lookup ROWS`: the --reuse lookup over a folder of ROWS committed rows.

A first process writes the folder the way a run leaves it (shards of 10,000 rows with short
texts, batchgen's metadata and a key index beside each). A second, fresh process then does what
a --reuse run does, and nothing else: it opens the folder (checks every shard, builds the merged
index) and looks up ROWS incoming requests in batches of 1,024, in the folder's order, 99 of
every 100 found (a nightly dataset that grew by 1%), reading each found row's outputs back from
its shard. Reported: seconds to open, lookup rows/s, and that process's peak RSS.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.memory import fresh_process

ROWS_PER_SHARD = 10_000
BATCH = 1_024
FINGERPRINT = {"model_files": {"bench": True}, "engine": "fake", "sampling": {"max_tokens": 8}}


def run_reuse_lookup(rows: int, work_dir: Path) -> dict[str, Any]:
    """Make the folder, then time its lookups in a fresh process; the report."""
    from pipeline.bench.machine import machine_info

    folder = work_dir / "earlier"
    made = _child({"step": "make", "rows": rows, "folder": str(folder)})
    looked = _child({"step": "lookup", "rows": rows, "folder": str(folder), "work": str(work_dir)})
    return {"rows": rows, "make": made, "lookup": looked, "machine": machine_info()}


def _child(job: dict[str, Any]) -> dict[str, Any]:
    return fresh_process("pipeline.bench.reuse", json.dumps(job), what="reuse bench")


def _keys(start: int, count: int) -> np.ndarray:
    """Deterministic stand-in request keys: row i's key is a digest-like function of i."""
    rng = np.random.default_rng(start)
    return np.frombuffer(rng.bytes(16 * count), dtype="S16")


def make_folder(rows: int, folder: Path) -> dict[str, Any]:
    """A folder of committed shards with key indexes, as a run leaves it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.checkpoint import STATE_DIR, claim_job_record
    from pipeline.reuse.index import write_index
    from pipeline.sinks import ParquetShardWriter, output_schema, rank_dir, shard_name

    rank_dir(folder, 0).mkdir(parents=True, exist_ok=True)
    (folder / STATE_DIR).mkdir(exist_ok=True)
    claim_job_record(folder, FINGERPRINT)  # the settings a --reuse run compares with its own
    schema = ParquetShardWriter(folder, 0, output_schema(False, []), {"fingerprint": FINGERPRINT})
    started = time.monotonic()
    for seq, start in enumerate(range(0, rows, ROWS_PER_SHARD)):
        n = min(ROWS_PER_SHARD, rows - start)
        keys = _keys(start, n)
        numbers = np.arange(start, start + n)
        columns = {
            "id": pa.array(numbers.astype(str)),
            "sample_index": pa.array(np.zeros(n, dtype=np.int32)),
            "text": pa.array(np.char.add("answer ", numbers.astype(str))),
            "finish_reason": pa.array(["stop"] * n),
            "prompt_tokens": pa.array(np.full(n, 20, dtype=np.int32)),
            "completion_tokens": pa.array(np.full(n, 8, dtype=np.int32)),
            "error": pa.nulls(n, pa.string()),
            "request_key": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(16), n, [None, pa.py_buffer(keys.tobytes())]
            ),
            "reused_from": pa.nulls(n, pa.string()),
        }
        table = pa.Table.from_arrays([columns[f.name] for f in schema.schema], schema=schema.schema)
        shard = rank_dir(folder, 0) / shard_name(0, seq)
        pq.write_table(table, shard, compression="zstd")
        write_index(shard, keys, np.arange(n, dtype=np.uint32), n)
    return {"seconds": round(time.monotonic() - started, 1)}


def lookup(rows: int, folder: Path, work: Path) -> dict[str, Any]:
    """Open the folder as --reuse does and look up `rows` requests; times and peak RSS of
    each step (the kernel's high-water mark is reset between them)."""
    from pipeline.records import PromptRow
    from pipeline.reuse.lookup import Reuse

    rss_start = _status_mb("VmRSS")
    started = time.monotonic()
    reuse = Reuse(FINGERPRINT, (str(folder),), work / "index")
    opened = time.monotonic() - started
    open_peak = _status_mb("VmHWM")
    index_mb = sum(p.stat().st_size for p in (work / "index").rglob("*") if p.is_file()) / 1e6
    _reset_peak()
    sampling = {"max_tokens": 8}
    found = 0
    started = time.monotonic()
    for start in range(0, rows, BATCH):
        count = min(BATCH, rows - start)
        keys = _batch_keys(start, count)
        batch = [
            PromptRow(id=str(start + i), seq=start + i, sampling=sampling, request_key=bytes(k))
            for i, k in enumerate(keys)
        ]
        reuse.lookup(batch)
        found += sum(r.reused is not None for r in batch)
    seconds = time.monotonic() - started
    lookup_peak = _status_mb("VmHWM")
    anon, file = _status_mb("RssAnon"), _status_mb("RssFile")
    reuse.close()
    return {
        "open_seconds": round(opened, 1),
        "lookup_seconds": round(seconds, 1),
        "lookup_rows_per_s": round(rows / seconds),
        "found": found,
        "mismatched": reuse.counts.mismatched,
        "index_mb_on_disk": round(index_mb, 1),
        "rss_at_start_mb": rss_start,
        "open_peak_rss_mb": open_peak,
        "lookup_peak_rss_mb": lookup_peak,
        "rss_anon_at_end_mb": anon,
        "rss_file_at_end_mb": file,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _batch_keys(start: int, count: int) -> list[bytes]:
    """The keys of incoming rows start..start+count: the folder's, one in 100 replaced."""
    keys = []
    for shard_start in range(start - start % ROWS_PER_SHARD, start + count, ROWS_PER_SHARD):
        shard = _keys(shard_start, ROWS_PER_SHARD)
        lo, hi = max(start, shard_start), min(start + count, shard_start + ROWS_PER_SHARD)
        raw = shard[lo - shard_start : hi - shard_start].tobytes()  # full 16 bytes each
        keys += [raw[j : j + 16] for j in range(0, len(raw), 16)]
    for i in range(start, start + count):
        if i % 100 == 99:  # a new row: a key no folder holds
            keys[i - start] = (b"new" + i.to_bytes(13, "big"))[:16]
    return keys


def _reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) so the next step's peak is its own."""
    with contextlib.suppress(OSError):  # elsewhere the peaks include the earlier steps
        Path("/proc/self/clear_refs").write_text("5")


def _status_mb(key: str) -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def format_reuse_lookup(report: dict[str, Any]) -> str:
    m, r = report["machine"], report["lookup"]
    return "\n".join(
        [
            f"reuse lookup over {report['rows']:,} committed rows ({m.get('cpu')}, "
            f"{m.get('cpu_cores')} cores)",
            f"  open (check {report['rows'] // ROWS_PER_SHARD or 1:,} shards, build the merged "
            f"index, {r['index_mb_on_disk']:,} MB on disk): {r['open_seconds']} s",
            f"  lookup: {report['rows']:,} rows in {r['lookup_seconds']} s = "
            f"{r['lookup_rows_per_s']:,} rows/s ({r['found']:,} found and read back)",
            f"  peak RSS: open {r['open_peak_rss_mb']} MB, lookup {r['lookup_peak_rss_mb']} MB "
            f"(at start {r['rss_at_start_mb']} MB; at the end {r['rss_anon_at_end_mb']} MB "
            f"anonymous, {r['rss_file_at_end_mb']} MB mapped files)",
        ]
    )


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    if job["step"] == "make":
        out = make_folder(job["rows"], Path(job["folder"]))
    else:
        out = lookup(job["rows"], Path(job["folder"]), Path(job["work"]))
    print(json.dumps(out))
