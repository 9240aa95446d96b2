"""Operating a job of many ranks: the fleet view of `batchgen status`, each rank's Prometheus
metrics file, and the scale bench's commit path (fake engine throughout)."""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path

import pytest
from conftest import FAKE_ENGINE, hold_rank_lock, run_args, run_cli, write_prompts
from prometheus_client.parser import text_string_to_metric_families

from pipeline import status as status_mod
from pipeline.bench.scale import commit_probe
from pipeline.checkpoint import Manifest
from pipeline.fleet import render_fleet
from pipeline.metrics import METRICS, MetricsFile, metrics_path
from pipeline.progress import Progress
from pipeline.records import ResultRow

RANKS = 20  # more than status.DETAIL_RANKS: the text view is the fleet view
NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ranks 0-16 of 20 finished (5 prompts each, a shard of 2 rows at a time); 17-19 not."""
    base = tmp_path_factory.mktemp("fleet")
    src = write_prompts(base / "in.parquet", [f"prompt {i}" for i in range(5 * RANKS)])
    out = base / "out"
    for rank in range(17):
        run_cli(
            *run_args(src, out, *FAKE_ENGINE, "--rows-per-shard", "2"),
            "--num-ranks",
            str(RANKS),
            "--rank",
            str(rank),
        )
    return out


def _set(out: Path, rank: int, **fields) -> None:
    """Rewrite a rank's state as one manifest generation with `fields` changed."""
    from conftest import manifest_state, save_manifest_state

    save_manifest_state(out, {**manifest_state(out, rank), **fields}, rank)


def test_the_fleet_view_names_the_ranks_to_act_on_and_projects_the_finish(
    fleet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(fleet, out)
    monkeypatch.setattr(status_mod.time, "time", lambda: NOW)
    _set(out, 3, status="failed", report={"error": "no space left on device"})
    _set(out, 5, status="running")  # a free lock under "running": crashed
    # Rank 16 is live (its lock held below): 2 of 5 prompts in a run 100 s old, its newest
    # shard 40 s ago; rank 15 is live with no commit for 2 hours: stalled.
    m16 = Manifest.load(out, 16)
    shards = [{**s, "committed_at": NOW - 40.0, "generate_seconds": 60.0} for s in m16.shards[:1]]
    _set(out, 16, status="running", shards=shards, updated_at=NOW - 40.0)
    _set(out, 15, status="running", updated_at=NOW - 7200.0)
    holders = [hold_rank_lock(out, rank) for rank in (15, 16)]
    try:
        result = run_cli("status", out, expect=4)
        view = json.loads(run_cli("status", out, "--json", expect=4).output)["fleet"]
    finally:
        for holder in holders:
            holder.kill()
            holder.communicate()
    lines = result.output.splitlines()
    assert lines[0].startswith("all 20 ranks: failed | ")
    assert lines[1:-1] == [
        "fleet: 13 finished, 2 running (1 stalled), 1 failed, 1 crashed, 0 interrupted, "
        "3 not started",
        "  failed (see `batchgen status --json` for each error; fix, then rerun): 1 rank: 3",
        "  stalled (running, no commit for 10m00s or more): 1 rank: 15",
        "  crashed (rerun to resume): 1 rank: 5",
        "  not started: 3 ranks: 17-19",
        # Rank 16's run: 2 prompts in 100 s, 3 to go. Rank 15 has committed all it holds.
        "  slowest running: rank 16 2/5 at 0.02/s, 2m30s to go; rank 15 5/5 at 0.00/s, 0s to go",
    ]
    # 2 prompts in 100 s: 0.02/s; 3 left of rank 16, 15 of the three ranks not started.
    assert view["prompts_per_s"] == 0.02
    assert view["remaining_prompts"] == 3 + 15
    assert view["projected_seconds"] == 900.0
    assert lines[-1] == (
        "  projected finish: 2027-01-15 08:15 UTC (in 15m00s): 18 prompts left at the running "
        "ranks' 0.02 prompts/s, if the ranks not running are started too"
    )
    assert view["stalled"] == [15] and view["not_started"] == [17, 18, 19]


def test_render_fleet_lists_many_ranks_as_runs() -> None:
    view = {
        "finished": 0,
        "running": 0,
        "stalled": [],
        "stalled_after_seconds": 600.0,
        "failed": [],
        "crashed": [],
        "interrupted": [],
        "not_started": [r for r in range(1000) if r % 50 != 7],
        "slowest": [],
        "remaining_prompts": None,
        "projected_seconds": None,
    }
    assert render_fleet(view, NOW)[1] == (
        "  not started: 980 ranks: 0-6, 8-56, 58-106, 108-156, 158-206, 208-256, 258-306, "
        "308-356, 358-406, 408-456 and 11 more runs of ranks"
    )


def test_each_rank_writes_a_prometheus_textfile(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "in.parquet", [f"prompt {i}" for i in range(30)] + [None])
    metrics = tmp_path / "metrics"
    for rank in (0, 3):
        run_cli(
            *run_args(src, tmp_path / "out", *FAKE_ENGINE),
            "--num-ranks",
            "4",
            "--rank",
            str(rank),
            "--metrics-textfile",
            metrics,
            "--max-error-rate",
            "0.5",
        )
    assert sorted(os.listdir(metrics)) == ["batchgen_rank_00000.prom", "batchgen_rank_00003.prom"]
    text = (metrics / "batchgen_rank_00003.prom").read_text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # prometheus_client's parser names a counter family without its _total suffix.
    names = {re.sub("_total$", "", name) for name in METRICS}
    assert set(families) == names
    values = {s.name: s.value for f in families.values() for s in f.samples}
    labels = {tuple(sorted(s.labels.items())) for f in families.values() for s in f.samples}
    assert labels == {(("output", str(tmp_path / "out")), ("rank", "3"))}
    # Rank 3 of 4 holds the last 7 of 31 rows; the last (None) is an error row.
    assert values["batchgen_rows_total"] == 7.0
    assert values["batchgen_prompts_total"] == 7.0
    assert values["batchgen_error_rows_total"] == 1.0
    assert values["batchgen_completion_tokens_total"] == 6 * 8.0  # the fake engine's 8 tokens
    assert values["batchgen_engine_restarts_total"] == 0.0
    assert values["batchgen_prompts_todo"] == 0.0
    assert values["batchgen_requests_in_flight"] == 0.0  # every prompt came back
    assert values["batchgen_rows_per_second"] > 0
    assert not [n for n in os.listdir(metrics) if n.startswith(".")]  # no temporary file left


def test_the_2000th_commit_does_no_more_work_than_the_10th(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted, not timed: the commit path lists no folder and reads no file, whatever the
    rank's shard count (timings are the scale bench's, docs/benchmarks.md)."""
    calls: list[str] = []
    real_listdir, real_scandir = os.listdir, os.scandir
    monkeypatch.setattr(os, "listdir", lambda p=".": calls.append("listdir") or real_listdir(p))
    monkeypatch.setattr(os, "scandir", lambda p=".": calls.append("scandir") or real_scandir(p))
    report = commit_probe(tmp_path / "probe", 2, 60)
    assert report["commits"] == 60
    # Manifest.save at the start lists the state folder once; no commit lists anything.
    assert calls == ["listdir"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ranks", "10"], "Error: --ranks: only for --scale"),
        (["--scale"], "Error: --scale needs --output DIR (the job is left there)"),
    ],
)
def test_scale_bench_flags(args: list[str], message: str) -> None:
    result = run_cli("bench", *args, expect=2)
    assert result.output.splitlines()[-1] == message


def test_in_flight_counts_prompts_the_engine_took_and_has_not_given_back() -> None:
    """The gauge a fleet reads to see a rank's engine full or starved: prompts pulled from the
    feed (None: nothing ready yet) less prompts back, a prompt of two samples counted once."""
    progress = Progress(todo=5, done_before=0, stream=io.StringIO(), interval=3600)
    feed = progress.count_sent(iter(["a", None, "b", "c", None, "d", "e"]))
    assert [next(feed) for _ in range(4)] == ["a", None, "b", "c"]
    assert progress.metric_values(time.monotonic())["batchgen_requests_in_flight"] == 3
    two_samples = [ResultRow("a", 0, i, "x", "length", 4, 5) for i in (0, 1)]
    progress.count_returned(two_samples)
    assert progress.metric_values(time.monotonic())["batchgen_requests_in_flight"] == 2
    assert list(feed) == [None, "d", "e"]
    progress.count_returned([ResultRow(k, 1, 0, "x", "stop", 4, 5) for k in "bcd"])
    assert progress.metric_values(time.monotonic())["batchgen_requests_in_flight"] == 1


def test_the_final_metrics_have_nothing_in_flight(tmp_path: Path) -> None:
    """A run stopped with a prompt still in the engine (dropped, redone on resume): once its
    engine loop has ended, its last metrics file says nothing is in flight."""
    metrics = MetricsFile(tmp_path, 0, "out")
    progress = Progress(todo=2, done_before=0, stream=io.StringIO(), interval=3600, metrics=metrics)
    assert list(progress.count_sent(iter(["a", "b"]))) == ["a", "b"]
    progress.count_returned([ResultRow("a", 0, 0, "x", "stop", 4, 5)])
    assert progress.metric_values(time.monotonic())["batchgen_requests_in_flight"] == 1
    progress.close()
    text = metrics_path(tmp_path, 0).read_text()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert values["batchgen_requests_in_flight"] == 0.0


def test_the_scale_bench_counts_ids_and_repeats_a_bucket_at_a_time(tmp_path, monkeypatch):
    """The one-rank bench's exactly-once count (`_ids`) hashes ids into buckets and counts each
    alone (all at once it took 19.9 GB at 20M rows): a shard copied under a new name is counted
    as repeats, whatever the number of buckets."""
    import shutil

    from pipeline.bench import scale

    src = write_prompts(tmp_path / "in.parquet", [f"row {i}" for i in range(50)])
    out = tmp_path / "out"
    run_cli(*run_args(src, out, *FAKE_ENGINE, "--rows-per-shard", "10"))
    assert scale._ids(out, 0) == (50, 50)
    monkeypatch.setattr(scale, "IDS_PER_BUCKET", 7)  # 60 ids: 9 buckets
    assert scale._ids(out, 0) == (50, 50)
    shard = sorted((out / "rank-00000").glob("part-*.parquet"))[2]
    shutil.copy(shard, shard.with_name(shard.name.replace("-000002", "-000099")))
    assert scale._ids(out, 0) == (60, 50)
