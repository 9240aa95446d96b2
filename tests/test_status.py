"""`batchgen status OUT`: per-rank progress and state, the all-ranks line, --json, exit codes.

The folders come from real fake-engine runs of three ranks; a test then sets the state it is
about in a manifest (a crash leaves "running" under a free lock; a signal leaves "interrupted")
and pins the clock and the timing fields so that whole outputs can be compared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    FAKE_ENGINE,
    hold_rank_lock,
    manifest_state,
    run_args,
    run_cli,
    save_manifest_state,
)

from pipeline import status as status_mod

ROWS = 600  # 200 prompts a rank, --n 2: 400 rows a rank in 4 shards of 100
NOW = 1_800_000_000.0
LAST_RUN = {"prompts": 200, "generate_seconds": 1.5, "output_tokens_per_second": 1234.5}


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_mod.time, "time", lambda: NOW)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ranks 0-2 of one run, all finished; prompts 5 and 250 are null (2 error rows each)."""
    base = tmp_path_factory.mktemp("status")
    prompts: list[str | None] = [f"Question {i}: what is {i} plus {i}?" for i in range(ROWS)]
    prompts[5] = prompts[250] = None
    src = base / "rows.parquet"
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string())}), src)
    out = base / "out"
    for rank in range(3):
        run_cli(
            *run_args(
                src,
                out,
                "--n",
                "2",
                "--temperature",
                "0.5",
                "--rows-per-shard",
                "100",
                *FAKE_ENGINE,
                "--num-shards",
                "3",
                "--shard-index",
                str(rank),
            )
        )
    return out


@pytest.fixture
def out(three_ranks: Path, tmp_path: Path) -> Path:
    """A private copy whose manifests carry fixed hosts, pids, times and last-run figures."""
    copy = tmp_path / "out"
    shutil.copytree(three_ranks, copy)
    for rank in range(3):
        edit(copy, rank, host=f"node{rank}", pid=4000 + rank, started_at=NOW - 9000.0)
        edit(copy, rank, updated_at=NOW - 7205.0)
        m = manifest(copy, rank)
        edit(
            copy, rank, report={**m["report"], "this_run": {**m["report"]["this_run"], **LAST_RUN}}
        )
    return copy


def manifest(out: Path, rank: int) -> dict:
    return manifest_state(out, rank)


def edit(out: Path, rank: int, **fields) -> None:
    save_manifest_state(out, {**manifest_state(out, rank), **fields}, rank)


def tokens(out: Path, files: list[str]) -> tuple[int, int]:
    """(prompt, output) tokens of these shards, counted from the data, not the manifest."""
    table = pa.concat_tables(pq.read_table(out / f"rank-{f[5:10]}" / f) for f in files)
    rows = table.to_pylist()
    prompt = sum(r["prompt_tokens"] or 0 for r in rows if r["sample_index"] == 0 and not r["error"])
    return prompt, sum(r["completion_tokens"] or 0 for r in rows)


def shards_of(out: Path, rank: int) -> list[str]:
    return sorted(p.name for p in out.glob(f"rank-*/part-{rank:05d}-*.parquet"))


def finished_block(out: Path, rank: int) -> list[str]:
    pt, ct = tokens(out, shards_of(out, rank))
    return [
        f"rank {rank}: finished | 200/200 prompts (100.0%), 400 rows in 4 shards | "
        f"{2 if rank < 2 else 0} errors | updated 2h00m05s ago",
        f"  tokens: {pt:,} prompt + {ct:,} output | finish reasons: "
        + ("error 2, length 398" if rank < 2 else "length 400"),
        "  last run: 200 prompts in 1.5s of generation, 1,234.5 output tok/s",
    ]


def crash_rank_1(out: Path) -> str:
    """What a SIGKILL between a shard's rename and the manifest update leaves behind."""
    m = manifest(out, 1)
    dropped = m["shards"].pop()["file"]
    edit(out, 1, shards=m["shards"], status="running", report={}, updated_at=NOW - 65.0)
    return dropped


def test_all_finished_exits_0(out):
    result = run_cli("status", out, expect=0)
    all_pt = sum(tokens(out, shards_of(out, r))[0] for r in range(3))
    assert all_pt > 0
    assert result.output.splitlines() == [
        *finished_block(out, 0),
        *finished_block(out, 1),
        *finished_block(out, 2),
        "all 3 ranks: finished | 600/600 prompts (100.0%), 1,200 rows in 12 shards | 4 errors "
        "| 3 finished",
    ]


def test_crashed_and_missing_ranks_exit_3(out):
    dropped = crash_rank_1(out)
    assert dropped == "part-00001-000003.parquet"
    shutil.rmtree(out / "rank-00002")
    shutil.rmtree(out / ".batchgen" / "rank-00002")
    pt, ct = tokens(out, shards_of(out, 1)[:3])
    result = run_cli("status", out, expect=3)
    assert result.output.splitlines() == [
        *finished_block(out, 0),
        "rank 1: crashed (rerun to resume) | 150/200 prompts (75.0%), 300 rows in 3 shards | "
        "2 errors | updated 1m05s ago",
        f"  tokens: {pt:,} prompt + {ct:,} output | finish reasons: error 2, length 298",
        "  1 shard on disk not yet in the manifest (part-00001-000003.parquet): committed just "
        "before a crash; the next run adopts it",
        "rank 2: not started",
        "all 3 ranks: incomplete | 350 prompts, 700 rows in 7 shards | 4 errors | 1 finished, "
        "1 crashed, 1 not started",
    ]


def test_json_is_one_object_with_every_rank(out):
    crash_rank_1(out)
    shutil.rmtree(out / "rank-00002")
    shutil.rmtree(out / ".batchgen" / "rank-00002")
    result = run_cli("status", out, "--json", expect=3)
    assert len(result.output.splitlines()) == 1
    got = json.loads(result.output)
    pt0, ct0 = tokens(out, shards_of(out, 0))
    pt1, ct1 = tokens(out, shards_of(out, 1)[:3])
    rank0_run = manifest(out, 0)["report"]["this_run"]
    assert got == {
        "output": str(out),
        "state": "incomplete",
        "exit_code": 3,
        "num_shards": 3,
        "ranks": [
            {
                "rank": 0,
                "state": "finished",
                "holder": None,
                "manifest_status": "finished",
                "prompts": 200,
                "total_prompts": 200,
                "rows": 400,
                "shards": 4,
                "errors": 2,
                "prompt_tokens": pt0,
                "completion_tokens": ct0,
                "finish_reasons": {"error": 2, "length": 398},
                "started_at": NOW - 9000.0,
                "updated_at": NOW - 7205.0,
                "age_seconds": 7205.0,
                "host": "node0",
                "pid": 4000,
                "error": None,
                "last_run": rank0_run,
                "engine_failures": [],
                "unlisted_shards": [],
            },
            {
                "rank": 1,
                "state": "crashed",
                "holder": None,
                "manifest_status": "running",
                "prompts": 150,
                "total_prompts": 200,
                "rows": 300,
                "shards": 3,
                "errors": 2,
                "prompt_tokens": pt1,
                "completion_tokens": ct1,
                "finish_reasons": {"error": 2, "length": 298},
                "started_at": NOW - 9000.0,
                "updated_at": NOW - 65.0,
                "age_seconds": 65.0,
                "host": "node1",
                "pid": 4001,
                "error": None,
                "last_run": None,
                "engine_failures": [],
                "unlisted_shards": ["part-00001-000003.parquet"],
            },
            {"rank": 2, "state": "not_started", "holder": None},
        ],
        "all": {
            "prompts": 350,
            "total_prompts": None,
            "rows": 700,
            "shards": 7,
            "errors": 4,
            "prompt_tokens": pt0 + pt1,
            "completion_tokens": ct0 + ct1,
            "finish_reasons": {"error": 4, "length": 696},
            "states": {"finished": 1, "crashed": 1, "not_started": 1},
            # Only rank 0's last run finished and reported; it generated every prompt.
            "last_run_reuse": {
                "generated_prompts": 200,
                "reused_prompts": 0,
                "duplicate_prompts": 0,
                "engine_requests": rank0_run["reuse"]["engine_requests"],
            },
        },
        # Rank 2 never started: its prompts count as the started ranks' mean total (200).
        "fleet": {
            "ranks": 3,
            "finished": 1,
            "running": 0,
            "stalled": [],
            "stalled_after_seconds": 600.0,
            "failed": [],
            "crashed": [1],
            "interrupted": [],
            "not_started": [2],
            "slowest": [],
            "prompts_per_s": 0.0,
            "remaining_prompts": 250,
            "projected_seconds": None,
            "projected_finish": None,
        },
    }


def test_failed_rank_shows_its_error_and_exits_4(out):
    error = (
        f"writing shard part-00002-000004.parquet in {out} failed: no space left on device; "
        f"400 prompts committed in {out} are safe; free space on the disk holding {out} and "
        "rerun the same command to resume"
    )
    m = manifest(out, 2)
    edit(out, 2, status="failed", report={**m["report"], "error": error})
    result = run_cli("status", out, expect=4)
    lines = result.output.splitlines()
    assert lines[6:] == [
        "rank 2: failed (fix the error below, then rerun to resume) | 200/200 prompts (100.0%), "
        "400 rows in 4 shards | 0 errors | updated 2h00m05s ago",
        *finished_block(out, 2)[1:],
        f"  error: {error}",
        "all 3 ranks: failed | 600/600 prompts (100.0%), 1,200 rows in 12 shards | 4 errors | "
        "2 finished, 1 failed",
    ]


def test_running_needs_a_live_lock_holder_and_interrupted_names_its_signal(out):
    edit(out, 0, status="interrupted", report={**manifest(out, 0)["report"], "signal": "SIGUSR1"})
    edit(out, 1, status="running")
    for path in (out / ".batchgen" / "rank-00002").glob("manifest-*"):
        path.unlink()  # rank 2 has taken its lock, no manifest yet
    holders = [hold_rank_lock(out, rank) for rank in (1, 2)]
    try:
        who = [(out / ".batchgen" / f"rank-0000{r}" / "lock").read_text().strip() for r in (1, 2)]
        assert who[0].startswith(f"pid {holders[0].pid} on ")
        result = run_cli("status", out, expect=3)
        lines = result.output.splitlines()
        assert lines[0] == (
            "rank 0: interrupted by SIGUSR1 (rerun to resume) | 200/200 prompts (100.0%), 400 "
            "rows in 4 shards | 2 errors | updated 2h00m05s ago"
        )
        # Its manifest was last updated 2 hours ago: a live rank that long without a commit
        # is stalled.
        assert lines[3] == (
            f"rank 1: running ({who[0]}), stalled | 200/200 prompts (100.0%), 400 rows in 4 shards | "
            "2 errors | updated 2h00m05s ago"
        )
        assert lines[6:] == [
            f"rank 2: running ({who[1]})",
            "all 3 ranks: incomplete | 400 prompts, 800 rows in 8 shards | 4 errors | "
            "2 running, 1 interrupted",
        ]
    finally:
        for holder in holders:
            holder.kill()
            holder.communicate()
    # The holders are gone: a "running" manifest under a free lock is a crash.
    result = run_cli("status", out, expect=3)
    assert result.output.splitlines()[3].startswith("rank 1: crashed (rerun to resume) | ")
    assert result.output.splitlines()[6] == "rank 2: not started"


@pytest.mark.parametrize(
    "folder, message",
    [
        ("missing", "Error: {path}: no such folder; give the --output folder of a run"),
        (
            "empty",
            "Error: {path}: no batchgen run there (no .batchgen/rank-*/); give the --output "
            "folder of a run",
        ),
    ],
)
def test_not_a_batchgen_folder_exits_1(tmp_path, folder, message):
    path = tmp_path / folder
    if folder == "empty":
        path.mkdir()
        pq.write_table(pa.table({"x": [1]}), path / "part-0.parquet")
    result = run_cli("status", path, expect=1)
    assert result.output == message.format(path=path) + "\n"


def test_help_documents_the_exit_codes():
    result = run_cli("status", "--help")
    assert "  0  every rank finished\n" in result.output
    assert "  3  incomplete: a rank is running, interrupted, crashed or not started\n" in (
        result.output
    )
    assert "  4  failed: a rank failed; fix its error, then rerun to resume\n" in result.output
