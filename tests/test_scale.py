"""Structures whose size must not grow with the job: committed positions as ranges, the
--id-column check that spills to disk, and the refusal of an earlier batchgen's folder."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import (
    FAKE_ENGINE,
    manifest_state,
    run_args,
    run_cli,
    write_prompts,
)

import pipeline
from pipeline import idcheck
from pipeline.errors import BatchgenError
from pipeline.idcheck import UniqueIds
from pipeline.positions import Positions


def test_positions_merge_count_and_gaps():
    done = Positions([[10, 20], [0, 5], [5, 8], [30, 31]])
    assert done.to_list() == [[0, 8], [10, 20], [30, 31]]
    assert done.count() == 19 and len(done) == 3
    assert done.missing(0, 40) == [(8, 10), (20, 30), (31, 40)]
    assert done.missing(12, 18) == [] and done.missing(18, 25) == [(20, 25)]
    assert 7 in done and 8 not in done and 30 in done
    assert Positions.of([3, 1, 2, 2, 9]).to_list() == [[1, 4], [9, 10]]


def test_a_million_committed_rows_in_input_order_weigh_a_few_ranges():
    done = Positions()
    for start in range(0, 1_000_000, 1000):  # shards of 1,000 rows, one row late in each
        done.update(Positions.of([*range(start, start + 998), start + 999]).to_list())
    done.update([[998 + s, 999 + s] for s in range(0, 1_000_000, 1000)])
    assert done.to_list() == [[0, 1_000_000]]


@pytest.mark.parametrize("in_memory", [100_000, 50])
def test_unique_ids_pass_and_repeats_are_refused_in_memory_or_spilled(in_memory):
    check = UniqueIds("key", in_memory=in_memory)
    for first in range(0, 1000, 100):
        check.add([f"id-{i}" for i in range(first, first + 100)], first)
    check.finish()
    check = UniqueIds("key", in_memory=in_memory)
    with pytest.raises(BatchgenError) as err:
        for first in range(0, 1000, 100):
            ids = [f"id-{i}" for i in range(first, first + 100)]
            if first == 700:
                ids[3] = "id-420"
            check.add(ids, first)
        check.finish()
    what = (
        "the id 'id-420' (rows 420 and 703)"
        if in_memory > 1000
        else "one id in rows 420 and 703 of this rank's input"
    )
    assert str(err.value) == (
        f"--id-column 'key' repeats {what}; resume needs unique ids: pick a unique column or "
        "omit --id-column"
    )
    assert check._dir is None  # the spill is removed


def test_spilled_ids_are_hashed_in_chunks_and_a_repeat_across_spills_is_found(monkeypatch):
    """Id strings are hashed HASH_CHUNK at a time and written SPILL_BUFFER records at a time, so
    a rank's memory does not grow with its rows; a repeat in different spills is still found."""
    monkeypatch.setattr(idcheck, "HASH_CHUNK", 64)
    monkeypatch.setattr(idcheck, "SPILL_BUFFER", 256)
    check = UniqueIds("key", in_memory=50)
    for first in range(0, 5000, 100):
        check.add([f"id-{i}" for i in range(first, first + 100)], first)
        assert check._buffered < 64 + 100 and check._held < 256 + 64 + 100
    check.finish()
    check = UniqueIds("key", in_memory=50)
    with pytest.raises(BatchgenError, match="one id in rows 1,234 and 4,903 of"):
        for first in range(0, 5000, 100):
            ids = [f"id-{i}" for i in range(first, first + 100)]
            if first == 4900:
                ids[3] = "id-1234"
            check.add(ids, first)
        check.finish()


def test_the_in_memory_ids_move_to_the_spill_a_chunk_at_a_time(monkeypatch):
    """Past `in_memory` ids the dict's ids are hashed HASH_CHUNK at a time (hashing them all at
    once made a ~40 MB peak at 100k ids), and a repeat of one of them is still found."""
    monkeypatch.setattr(idcheck, "HASH_CHUNK", 64)
    hashed: list[int] = []
    hash_ids = UniqueIds._hash

    def recording(self: UniqueIds) -> None:
        hashed.append(self._buffered)
        hash_ids(self)

    monkeypatch.setattr(UniqueIds, "_hash", recording)
    check = UniqueIds("key", in_memory=1000)
    check.add([f"id-{i}" for i in range(1001)], 0)
    assert max(hashed) == 64 and sum(hashed) == 1001
    with pytest.raises(BatchgenError, match="one id in rows 17 and 1,001 of"):
        check.add(["id-17"], 1001)
        check.finish()


def test_a_bucket_over_its_size_is_split_so_the_final_check_stays_small(monkeypatch):
    """At a billion ids in one rank each of the 256 buckets is ~94 MB: a bucket over BUCKET_BYTES
    is split by its hashes' next byte (streamed) before it is loaded. Here one bucket holds every
    id (7.2 MB of records) against a 64 KB limit: the check's traced memory stays under 4 MB
    (loaded whole it was 7.2 MB, three times that sorting), a repeat across the parts' levels
    is still found, naming both rows, and the spill is removed."""
    import tracemalloc

    monkeypatch.setattr(idcheck, "SPILL_BUCKETS", 1)  # level 0: every id in one bucket
    monkeypatch.setattr(idcheck, "BUCKET_BYTES", 1 << 16)
    monkeypatch.setattr(idcheck, "SPILL_BUFFER", 1 << 12)
    monkeypatch.setattr(idcheck, "HASH_CHUNK", 1 << 12)

    def fill(check: UniqueIds, repeat_at: int | None) -> None:
        for first in range(0, 300_000, 10_000):
            ids = [f"id-{i}" for i in range(first, first + 10_000)]
            if repeat_at is not None and first <= repeat_at < first + 10_000:
                ids[repeat_at - first] = "id-123456"
            check.add(ids, first)

    check = UniqueIds("key", in_memory=1000)
    fill(check, None)
    folder = check._dir
    tracemalloc.start()
    try:
        check.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, peak  # measured 2.2 MB; loaded whole: 16.8 MB
    assert folder is not None and not folder.exists()
    check = UniqueIds("key", in_memory=1000)
    fill(check, 299_999)
    with pytest.raises(BatchgenError, match="one id in rows 123,456 and 299,999 of"):
        check.finish()


def test_an_output_of_an_earlier_batchgen_is_refused_naming_its_version(tmp_path):
    """A flat folder (OUT/part-*.parquet, OUT/.batchgen/rank-00000.json) of resume format 2."""
    src = write_prompts(tmp_path / "in.parquet", [f"row {i}" for i in range(20)])
    out = tmp_path / "out"
    flags = [*FAKE_ENGINE, "--rows-per-shard", "5"]
    run_cli(*run_args(src, out, *flags))
    for shard in (out / "rank-00000").iterdir():
        shard.rename(out / shard.name)
    (out / "rank-00000").rmdir()
    state = {**manifest_state(out), "version": 2}
    shutil.rmtree(out / ".batchgen")
    (out / ".batchgen").mkdir()
    (out / ".batchgen" / "rank-00000.json").write_text(json.dumps(state))
    result = run_cli(*run_args(src, out, *flags), expect=1)
    v = pipeline.__version__
    assert result.output.splitlines()[-1] == (
        f"Error: {out} was written by batchgen {v} in resume format 2, which this batchgen {v} "
        f"(format 3) cannot resume; finish it with the version that made it (pip install "
        f"'batchgen=={v}'), or pass --overwrite to start it afresh here"
    )
    status = run_cli("status", out, expect=1)
    assert status.output == (
        f"Error: {out} was written by an earlier batchgen (a flat folder of shards, "
        ".batchgen/rank-*.json); use that version's `batchgen status`\n"
    )
    result = run_cli(*run_args(src, out, *flags), "--overwrite")
    assert "the files of an earlier batchgen" in result.output
    assert not list(out.glob("*.parquet")) and len(list(out.glob("rank-00000/*.parquet"))) == 4
