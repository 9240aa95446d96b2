"""What `batchgen status` reads of a rank: two small state files however many shards it has
committed (the head of its newest manifest generation and its newest commit record, which
carry the rank's totals), and the rank's whole state only where those are missing or stale.

Ranks are built through the commit path itself (`Checkpoint` and `ParquetShardWriter`, what a
run's committer thread calls per shard) with small shards, in this process; the files status
opens are counted with an audit hook, not timed."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from pipeline import status as status_mod
from pipeline.checkpoint import Checkpoint, Manifest, RankLock, RankSummary, manifest_path
from pipeline.fingerprint import fingerprint_digest
from pipeline.records import ResultRow
from pipeline.sinks import ParquetShardWriter, output_schema, rank_dir

FINGERPRINT = {"test": "status reads", "num_shards": 2}
ROWS_PER_SHARD = 3  # prompts of one sample each; the second of every shard hits its budget
NOW = 1_800_000_000.0

_OPENED: list[str] | None = None  # paths opened while a test listens (the audit hook below)


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], str | Path):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only while _OPENED is a list


def opened_by_status(out: Path) -> list[str]:
    """`read_status(out)` in this process: the files it opened in `out`, relative, in order."""
    global _OPENED
    _OPENED = []
    try:
        status_mod.read_status(out).to_dict()
        opened = _OPENED
    finally:
        _OPENED = None
    return [str(Path(p).relative_to(out)) for p in opened if Path(p).is_relative_to(out)]


def state_files(opened: list[str]) -> list[str]:
    """The rank state files among `opened` (not the lock, which the probes open)."""
    return [p for p in opened if p.startswith(".batchgen/rank-") and p.endswith(".json")]


class RankRun:
    """One run of a rank as the runner drives it: the lock, `Checkpoint.open` (resume), the
    generation written at its start, then one shard and commit record at a time."""

    def __init__(self, out: Path, rank: int, started: float = NOW - 1000.0) -> None:
        self.lock = RankLock(out, rank).acquire()
        self.checkpoint = Checkpoint(out, rank, 2)
        state = self.checkpoint.open(FINGERPRINT, 10_000, overwrite=False)
        self.checkpoint.set_status("running")
        self.seq = state.next_seq
        meta = {"fingerprint_sha256": fingerprint_digest(FINGERPRINT)}
        self.writer = ParquetShardWriter(out, rank, output_schema(False, []), meta)
        self.started = started  # when its generation began (wall clock)
        self.commits = 0

    def write(self) -> str:
        """A shard written and renamed, not recorded (a kill's window): its file name."""
        first = self.seq * ROWS_PER_SHARD
        rows = [
            ResultRow(f"p{i}", i, 0, "x", "length" if i % 3 == 1 else "stop", 5, 7)
            for i in range(first, first + ROWS_PER_SHARD)
        ]
        self.info = self.writer.write(rows, self.seq)
        self.seq += 1
        return self.info.file

    def commit(self, shards: int = 1) -> None:
        for _ in range(shards):
            self.write()
            self.commits += 1  # one every 10 s of generation
            self.info.committed_at = self.started + 10.0 * self.commits
            self.info.generate_seconds = 10.0 * self.commits
            self.checkpoint.commit(self.info)

    def end(self, status: str = "finished") -> None:
        self.checkpoint.set_status(status, {"this_run": {"prompts": 0}})
        self.lock.release()

    def crash(self) -> None:
        """A SIGKILL: the lock goes, nothing else is written."""
        self.lock.release()


def full_summary(out: Path, rank: int) -> dict:
    """The rank's summary computed from its whole state (generation and every record)."""
    return asdict(Manifest.load(out, rank).summary())


@pytest.mark.parametrize("commits", [3, 40])
def test_a_running_rank_costs_two_state_files_whatever_its_commits(
    tmp_path: Path, commits: int
) -> None:
    out = tmp_path / "out"
    run = RankRun(out, 0)
    run.commit(commits)
    state = ".batchgen/rank-00000"  # (the lock is this process's: no probe opens it)
    assert opened_by_status(out) == [
        f"{state}/head-00000000.json",
        f"{state}/commit-{commits - 1:06d}.json",
        ".batchgen/job.json",
    ]
    rank = status_mod.read_status(out).to_dict()["ranks"][0]
    assert (rank["state"], rank["prompts"], rank["rows"], rank["shards"]) == (
        "running",
        commits * ROWS_PER_SHARD,
        commits * ROWS_PER_SHARD,
        commits,
    )
    assert (rank["prompt_tokens"], rank["completion_tokens"]) == (5 * 3 * commits, 7 * 3 * commits)
    assert rank["finish_reasons"] == {"length": commits, "stop": 2 * commits}
    assert asdict(RankSummary.load(out, 0)) == full_summary(out, 0)
    run.crash()


def test_a_resumed_rank_counts_its_earlier_runs_and_reads_no_shard_list(tmp_path: Path) -> None:
    """Runs of 12 and 5 commits ended by crashes, then a third 7 commits in: the newest record's
    totals count all 24 shards; the generation folding in the first 17 is not read."""
    out = tmp_path / "out"
    for commits, started in ((12, NOW - 1000.0), (5, NOW - 800.0)):
        run = RankRun(out, 0, started)
        run.commit(commits)
        run.crash()
    run = RankRun(out, 0, NOW - 600.0)
    run.commit(7)
    state = ".batchgen/rank-00000"
    assert opened_by_status(out) == [
        f"{state}/head-00000002.json",
        f"{state}/commit-000023.json",
        ".batchgen/job.json",
    ]
    summary = RankSummary.load(out, 0)
    assert (summary.totals.shards, summary.prompts_committed) == (24, 24 * ROWS_PER_SHARD)
    # The fleet view's pace is the third run's alone: 7 shards of 3 prompts since it began.
    assert (summary.totals.run_prompts, summary.totals.run_began) == (21, NOW - 600.0)
    assert summary.totals.run_rate(NOW) == 21 / 600.0
    assert asdict(summary) == full_summary(out, 0)
    run.crash()


def test_a_crashed_rank_names_the_shard_its_record_missed_from_one_listing(
    tmp_path: Path,
) -> None:
    """Crashed with every shard recorded: its shard folder is listed, no shard list read.
    Crashed between a shard's rename and its record: the check of the listing against the
    totals fails, and the shard list is read to name the shard the next run adopts."""
    out = tmp_path / "out"
    run = RankRun(out, 0)
    run.commit(30)
    run.crash()
    state = ".batchgen/rank-00000"
    assert state_files(opened_by_status(out)) == [
        f"{state}/head-00000000.json",
        f"{state}/commit-000029.json",
    ]
    assert status_mod.read_status(out).ranks[0].unlisted == []

    run = RankRun(out, 0)
    run.commit(2)
    left = run.write()
    run.crash()
    assert state_files(opened_by_status(out)) == [
        f"{state}/head-00000001.json",
        f"{state}/commit-000031.json",
        # then the whole state, for the names of the shards it lists
        f"{state}/manifest-00000001.json",
        f"{state}/commit-000030.json",
        f"{state}/commit-000031.json",
    ]
    rank = status_mod.read_status(out).to_dict()["ranks"][0]
    assert (rank["state"], rank["shards"], rank["unlisted_shards"]) == ("crashed", 32, [left])


@pytest.mark.parametrize("crashed", [False, True])
def test_a_shard_deleted_by_hand_is_not_mistaken_for_an_unlisted_one(
    tmp_path: Path, crashed: bool
) -> None:
    """A listed shard deleted, and (crashed) an unlisted one beside it: as many shards on disk
    as the totals count, not the same names."""
    out = tmp_path / "out"
    run = RankRun(out, 0)
    run.commit(4)
    left = [run.write()] if crashed else []
    run.crash() if crashed else run.end()
    (rank_dir(out, 0) / "part-00000-000001.parquet").unlink()
    rank = status_mod.read_status(out).to_dict()["ranks"][0]
    state = "crashed" if crashed else "finished"
    assert (rank["state"], rank["shards"], rank["unlisted_shards"]) == (state, 4, left)


def test_records_a_crash_left_beside_a_newer_generation_are_not_taken_for_the_totals(
    tmp_path: Path,
) -> None:
    """A run's end killed after its new generation and head but before it deleted the commit
    records they fold in: the newest record extends the older generation, so status reads the
    whole state instead of taking that record's (older) totals."""
    out = tmp_path / "out"
    run = RankRun(out, 0)
    run.commit(6)
    run.crash()
    folder = manifest_path(out, 0)
    records = {p.name: p.read_bytes() for p in folder.glob("commit-*.json")}
    run = RankRun(out, 0)  # resumes: generation 1 folds in the six records and deletes them
    run.commit(2)  # records 6 and 7 extend generation 1
    run.end()  # generation 2 and its head, then the deletions; records 0-5 written back:
    for name, data in records.items():
        (folder / name).write_bytes(data)
    summary = RankSummary.load(out, 0)
    assert (summary.status, summary.totals.shards, summary.generation) == ("finished", 8, 2)
    assert asdict(summary) == full_summary(out, 0)


def older_batchgen(out: Path, rank: int) -> None:
    """Make a rank's state what a batchgen before the totals wrote: no heads, records of the
    shard alone."""
    folder = manifest_path(out, rank)
    for path in folder.glob("head-*.json"):
        path.unlink()
    for path in folder.glob("commit-*.json"):
        record = json.loads(path.read_text())
        del record["totals"]
        path.write_text(json.dumps(record))


def test_an_older_batchgens_folder_is_read_the_full_way_to_the_same_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status_mod.time, "time", lambda: NOW)
    new = tmp_path / "new"
    for rank, commits in ((0, 9), (1, 4)):
        run = RankRun(new, rank)
        run.commit(commits)
        run.crash() if rank == 0 else run.end()
    old = tmp_path / "old"
    shutil.copytree(new, old)
    for rank in (0, 1):
        older_batchgen(old, rank)
    expected = json.loads(json.dumps(status_mod.read_status(new).to_dict()).replace("/new", "/old"))
    assert status_mod.read_status(old).to_dict() == expected
    records = [p for p in opened_by_status(old) if "/commit-" in p]
    assert len(records) == 9  # rank 0's, one by one; rank 1's end folded its records in


def test_a_head_the_disk_had_no_room_for_fails_nothing_and_status_reads_the_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    from pipeline import rankstate

    real_write = rankstate.write_new

    def write_new(path: Path, data: dict) -> None:
        if path.name.startswith("head-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data)

    monkeypatch.setattr(rankstate, "write_new", write_new)
    out = tmp_path / "out"
    run = RankRun(out, 0)
    run.commit(5)
    run.end()
    assert sorted(p.name for p in manifest_path(out, 0).iterdir()) == [
        "lock",
        "manifest-00000001.json",
    ]
    assert state_files(opened_by_status(out)) == [".batchgen/rank-00000/manifest-00000001.json"]
    summary = RankSummary.load(out, 0)
    assert (summary.status, summary.totals.shards) == ("finished", 5)


def test_the_launchers_rank_layout_check_reads_each_ranks_two_small_files(tmp_path: Path) -> None:
    """`--data-parallel`'s check for another rank layout in OUT (`recorded_ranks`) reads each
    rank's summary, not its shard list: per rank the head and the newest commit record."""
    from pipeline.checkpoint import recorded_ranks

    global _OPENED
    out = tmp_path / "out"
    for rank in (0, 1):
        run = RankRun(out, rank)
        run.commit(30)
        run.crash()
    _OPENED = []
    try:
        assert recorded_ranks(out) == {0: 2, 1: 2}
        opened = [str(Path(p).relative_to(out)) for p in _OPENED]
    finally:
        _OPENED = None
    assert state_files(opened) == [
        f".batchgen/rank-{r:05d}/{name}"
        for r in (0, 1)
        for name in ("head-00000000.json", "commit-000029.json")
    ]
