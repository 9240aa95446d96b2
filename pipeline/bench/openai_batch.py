"""Streaming bench of batch request files on the fake engine: peak memory of `batchgen run
--openai-batch` and `batchgen export` at two input sizes (flat means: the same at 10x the lines),
and exactly-once output after a SIGKILL part-way through the larger run and a resume.

Usage: python jobs/tools/openai_batch_bench.py [--lines 1000000] [--small 100000] [--json]
The request files (about 1 KB a line) are generated into a temporary folder, deleted after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = tuple(
    [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "that",
        "for",
        "it",
        "as",
        "was",
        "with",
        "be",
        "by",
        "on",
        "not",
        "he",
        "this",
        "are",
        "or",
        "his",
        "from",
        "at",
        "which",
        "but",
        "have",
        "an",
        "they",
        "you",
        "were",
        "her",
        "she",
        "there",
        "been",
        "one",
        "all",
        "we",
        "their",
        "has",
        "would",
        "when",
        "if",
        "so",
        "no",
    ]
)
LINE_BYTES = 1000


def write_requests(path: Path, lines: int, seed: int = 0) -> int:
    """A chat request file of `lines` lines of about LINE_BYTES each; its size in bytes."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(lines):
            body: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "max_tokens": 8}
            if i % 3 == 0:
                body.update(temperature=0.7, seed=i)
            else:
                body["temperature"] = 0
            body["messages"] = [{"role": "user", "content": ""}]
            head = json.dumps({"custom_id": f"req-{i:09d}", "method": "POST"})
            room = LINE_BYTES - len(head) - len(json.dumps(body)) - 40
            words = []
            while room > 0:
                word = rng.choice(WORDS)
                words.append(word)
                room -= len(word) + 1
            body["messages"][0]["content"] = " ".join(words)
            line = {
                "custom_id": f"req-{i:09d}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
            fh.write(json.dumps(line) + "\n")
    return path.stat().st_size


def _batchgen(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", *map(str, args)]


def measured(command: list[str], kill_after_shards: int | None = None, out: Path | None = None):
    """Run `command`; (exit status, wall seconds, peak RSS in MiB of that process). With
    `kill_after_shards`, SIGKILL it once `out` holds that many committed shards."""
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after_shards is not None:
        assert out is not None
        while proc.poll() is None and len(list(out.glob("part-*.parquet"))) < kill_after_shards:
            time.sleep(0.2)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    if proc.returncode not in (0, -9) and proc.stderr is not None:
        sys.stderr.write(proc.stderr.read().decode()[-3000:])
    return proc.returncode, round(wall, 1), round(usage.ru_maxrss / 1024, 1)


def one_size(work: Path, lines: int, rows_per_shard: int) -> dict[str, Any]:
    """Generate, run and export `lines` requests; peak RSS and times of each step."""
    src = work / f"requests-{lines}.jsonl"
    size = write_requests(src, lines)
    out = work / f"out-{lines}"
    run = _batchgen(
        "run", "--openai-batch", src, "--output", out, "--engine", "fake",
        "--rows-per-shard", rows_per_shard, "--progress-seconds", "60",
    )  # fmt: skip
    code, run_s, run_rss = measured(run)
    assert code == 0, f"run exited {code}"
    results = work / f"results-{lines}.jsonl"
    code, export_s, export_rss = measured(_batchgen("export", out, "--openai-batch", results))
    assert code == 0, f"export exited {code}"
    with open(results, "rb") as fh:
        count = sum(1 for _ in fh)
    assert count == lines, f"export wrote {count} lines of {lines}"
    results.unlink()
    return {
        "lines": lines,
        "input_mb": round(size / 2**20, 1),
        "run_seconds": run_s,
        "run_peak_rss_mb": run_rss,
        "export_seconds": export_s,
        "export_peak_rss_mb": export_rss,
        "out": out,
        "src": src,
    }


def kill_and_resume(work: Path, big: dict[str, Any], rows_per_shard: int) -> dict[str, Any]:
    """The big run again, SIGKILLed after a third of its shards, resumed; exactly once?"""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    out = work / "out-killed"
    run = _batchgen(
        "run", "--openai-batch", big["src"], "--output", out, "--engine", "fake",
        "--rows-per-shard", rows_per_shard, "--progress-seconds", "60",
    )  # fmt: skip
    shards = max(1, big["lines"] // rows_per_shard // 3)
    code, _, _ = measured(run, kill_after_shards=shards, out=out)
    killed_at = len(list(out.glob("part-*.parquet")))
    code_resume, resume_s, resume_rss = measured(run)
    columns = ["id", "text"]
    resumed = ds.dataset(out, format="parquet").to_table(columns=columns).sort_by("id")
    clean = ds.dataset(big["out"], format="parquet").to_table(columns=columns).sort_by("id")
    return {
        "killed_exit": code,
        "shards_at_kill": killed_at,
        "resume_exit": code_resume,
        "resume_seconds": resume_s,
        "resume_peak_rss_mb": resume_rss,
        "rows": resumed.num_rows,
        "distinct_ids": pc.count_distinct(resumed.column("id")).as_py(),
        "equal_to_uninterrupted": resumed.equals(clean),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="batchgen-openai-bench-"))
    try:
        small = one_size(work, args.small, args.rows_per_shard)
        shutil.rmtree(small.pop("out"))
        small.pop("src").unlink()
        big = one_size(work, args.lines, args.rows_per_shard)
        kill = kill_and_resume(work, big, args.rows_per_shard)
        big.pop("out"), big.pop("src")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"small": small, "large": big, "kill_resume": kill}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, part in report.items():
            print(name + ": " + ", ".join(f"{k} {v}" for k, v in part.items()))
    return report


if __name__ == "__main__":
    main()
