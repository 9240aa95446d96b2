"""In-run deduplication across a resume, and exactly-once output with --reuse through seeded
SIGKILLs (tests/test_kill_harness.py's victim and pause points) and a --data-parallel run killed
whole: a row whose request an earlier attempt committed is served from that committed row (the
engine never gets it again) and the output equals an uninterrupted run's, row for row."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAKE_ENGINE, manifest_state, read_output, run_cli, shard_files
from hooks import PAUSE_ENV, STEP_ENV
from test_kill_harness import Victim, wait_until

from pipeline.checkpoint import lock_holder

# Every output column an uninterrupted run decides, the origin of reused rows included.
COMPARED = ["id", "sample_index", "text", "finish_reason", "completion_tokens", "reused_from"]
SEED = 20261205


def cycled(path: Path, n: int, cycle: int) -> Path:
    """n rows whose prompts repeat every `cycle` rows: row i asks what row i % cycle asks."""
    ids = [f"q{i:03d}" for i in range(n)]
    pq.write_table(
        pa.table({"id": ids, "prompt": [f"Question {i % cycle}?" for i in range(n)]}), path
    )
    return path


def args(src: Path, out: Path, *extra: str | Path) -> list[str]:
    return [
        "run", "--parquet", str(src), "--prompt-column", "prompt", "--id-column", "id",
        "--max-tokens", "8", "--temperature", "0", "--rows-per-shard", "5", *FAKE_ENGINE,
        *map(str, extra), "--output", str(out),
    ]  # fmt: skip


def rows(out: Path) -> dict[str, dict]:
    """The output by id, each id asserted to be there once."""
    table = read_output(out).select(COMPARED).to_pylist()
    ids = [r["id"] for r in table]
    assert len(ids) == len(set(ids)), "a row written twice"
    return {r["id"]: r for r in table}


def kill_ranks(out: Path, ranks: int) -> None:
    """SIGKILL every --data-parallel rank writing `out`, and its session (ranks outlive their
    launcher's kill, as a Slurm job step's cgroup would not let them), and wait until they are
    gone and their rank locks free: the whole job dies at once. Ranks are found by `out` (a
    unique temporary path) in their command lines; a dying process's command line reads empty
    before its locks are released (seen under load), so the locks are waited for too."""
    _kill_by_cmdline(out)
    deadline = time.monotonic() + 30
    while any(lock_holder(out, r) is not None for r in range(ranks)):
        assert time.monotonic() < deadline, f"a rank lock of {out} still held 30 s after SIGKILL"
        time.sleep(0.05)


def _kill_by_cmdline(out: Path) -> None:
    for _ in range(200):
        pids = []
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError, ValueError):
                cmdline = (proc / "cmdline").read_bytes()
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if str(out).encode() in cmdline and state not in "ZX":
                    pids.append(int(proc.name))
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    raise AssertionError(f"ranks writing {out} outlived SIGKILL: {pids}")


def reuse_report(out: Path, rank: int = 0) -> dict:
    return manifest_state(out, rank)["report"]["this_run"]["reuse"]


def test_a_resume_serves_duplicates_of_rows_committed_before_it_from_them(tmp_path):
    src = cycled(tmp_path / "in.parquet", 60, cycle=30)  # rows 30..59 repeat rows 0..29
    out = tmp_path / "out"
    run_cli(*args(src, out, "--limit", "30"))
    assert reuse_report(out)["engine_requests"] == 30
    result = run_cli(*args(src, out))
    assert "resuming rank 0: 30 prompts already committed" in result.output
    report = reuse_report(out)
    assert (report["engine_requests"], report["duplicate_prompts"]) == (0, 30)
    assert (report["generated_prompts"], report["reused_prompts"]) == (0, 0)
    clean = tmp_path / "clean"
    run_cli(*args(src, clean))
    assert reuse_report(clean)["engine_requests"] == 30
    assert rows(out) == rows(clean)


def test_a_resume_after_overwrite_has_nothing_of_its_own_to_serve(tmp_path):
    src = cycled(tmp_path / "in.parquet", 40, cycle=20)
    out = tmp_path / "out"
    run_cli(*args(src, out, "--limit", "20"))
    run_cli(*args(src, out, "--overwrite"))  # starts afresh: the 20 committed rows are gone
    report = reuse_report(out)
    assert (report["engine_requests"], report["duplicate_prompts"]) == (20, 20)
    assert len(rows(out)) == 40


@pytest.fixture
def earlier(tmp_path: Path) -> Path:
    """A --reuse folder holding the requests of rows 0..49."""
    out = tmp_path / "earlier"
    run_cli(*args(cycled(tmp_path / "earlier.parquet", 50, cycle=50), out))
    return out


@pytest.mark.parametrize("data_parallel", [1, 2])
def test_seeded_sigkills_with_reuse_and_duplicates_stay_exactly_once(
    tmp_path, earlier, data_parallel
):
    # 300 rows: 100 distinct requests, 50 of them in the --reuse folder; each asked 3 times.
    src = cycled(tmp_path / "in.parquet", 300, cycle=100)
    extra = ["--reuse", earlier, "--max-num-seqs", "2", "--data-parallel", str(data_parallel)]
    clean = tmp_path / "clean"
    run_cli(*args(src, clean, *extra))
    reference = rows(clean)
    reports = [reuse_report(clean, r) for r in range(data_parallel)]
    assert sum(r["reused_prompts"] for r in reports) == 150
    assert sum(r["engine_requests"] for r in reports) <= 50 * data_parallel

    rng = random.Random(f"{SEED}-{data_parallel}")
    out = tmp_path / "out"
    kinds = ["engine", "in_write", "after_rename"]
    rng.shuffle(kinds)
    for i, kind in enumerate(kinds):
        context = f"kill {i} ({kind}), seed {SEED}, --data-parallel {data_parallel}"
        env = {STEP_ENV: "0.5"}
        if kind != "engine":
            env[PAUSE_ENV] = f"{kind}:{rng.randint(1, 2)}"
        before = len(shard_files(out))
        victim = Victim(args(src, out, *extra), env)
        if kind == "engine":
            alive = wait_until(lambda b=before: len(shard_files(out)) > b, victim, 120, "shard")
        else:
            # --data-parallel prefixes each rank's lines with "[rank N] ".
            alive = wait_until(lambda v=victim: PAUSE_ENV in v.stderr, victim, 120, kind)
        code = victim.kill()
        kill_ranks(out, data_parallel)
        assert alive and code == -signal.SIGKILL, f"{context}: ended by itself:\n{victim.stderr}"
        done = rows(out) if shard_files(out) else {}  # committed rows: each once, as the clean
        assert all(reference[i] == r for i, r in done.items()), context
    # What the last attempt may generate: the requests outside the folder that the rank's own
    # earlier attempts did not commit (a rank serves duplicates from its own rows only).
    new = set(range(50, 100))
    left = [new - committed_requests(out, r) for r in range(data_parallel)]
    run_cli(*args(src, out, *extra))
    assert rows(out) == reference
    generated = sum(reuse_report(out, r)["engine_requests"] for r in range(data_parallel))
    assert len(set.union(*left)) <= generated <= sum(map(len, left)), (left, generated)


def committed_requests(out: Path, rank: int) -> set[int]:
    """The requests (prompt numbers) of the rows a rank has committed."""
    shards = sorted(out.glob(f"rank-{rank:05d}/part-*.parquet"))
    ids = pq.read_table(shards, columns=["id"]).column("id").to_pylist() if shards else []
    return {int(i[1:]) % 100 for i in ids}
