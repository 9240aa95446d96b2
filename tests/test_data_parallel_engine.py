"""`--data-parallel 2` on the real engine with the bundled model: two CPU ranks (a core and 1 GiB
of KV cache each) write every row exactly once, each equal to what one process writes (greedy,
float32), and leave no process behind. (Signals and deaths are proved on the fake engine, in
test_data_parallel.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REAL_ENGINE, SAMPLE, read_output, run_args, run_cli, run_subprocess

pytestmark = pytest.mark.engine

PROMPTS = 16


def session_members(session: int) -> list[int]:
    """Live processes of a session (a rank and whatever it started)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[3]) == session and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


def test_two_ranks_write_what_one_process_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    src = tmp_path / "prompts.parquet"
    pq.write_table(pq.read_table(SAMPLE).slice(0, PROMPTS), src)
    flags = ["--chat", "--temperature", "0", "--id-column", "id", "--rows-per-shard", "4"]

    reference = tmp_path / "one-process"
    run_cli(*run_args(src, reference, *flags, *REAL_ENGINE, max_tokens=16))
    out = tmp_path / "two-ranks"
    proc = run_subprocess(
        *run_args(src, out, *flags, *REAL_ENGINE, "--data-parallel", "2", max_tokens=16),
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr

    expected = read_output(reference).select(["id", "text", "finish_reason"]).to_pylist()
    got = read_output(out).select(["id", "text", "finish_reason"]).to_pylist()
    assert len(got) == PROMPTS and len({r["id"] for r in got}) == PROMPTS
    assert sorted(got, key=lambda r: r["id"]) == sorted(expected, key=lambda r: r["id"])
    assert {p.name[:10] for p in out.glob("rank-*/part-*.parquet")} == {"part-00000", "part-00001"}

    pids = [
        int(p) for p in re.findall(r"batchgen: rank \d of 2: pid (\d+) on CPU core", proc.stderr)
    ]
    assert len(pids) == 2, proc.stderr
    for rank in (0, 1):
        assert re.search(rf"^\[rank {rank}\] .* finished: 8 prompts this run", proc.stderr, re.M)
    assert re.search(
        r"batchgen: finished: 2 ranks \| 16 prompts this run \(16 rows, 0 errors\)", proc.stderr
    )
    for pid in pids:  # each rank's session, vLLM's engine processes included, is gone
        assert session_members(pid) == []
