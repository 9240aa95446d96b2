"""--output-format jsonl with the fake engine: each committed shard's rows again as JSON Lines
beside its Parquet, every committed row exactly once across the JSONL files after a kill and a
resume, --overwrite and a format change handled as the resume rules say."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pyarrow.json as pajson
import pyarrow.parquet as pq
from conftest import FAKE_ENGINE, SAMPLE, run_args, run_cli
from hooks import PAUSE_ENV
from test_kill_harness import Victim, wait_until

IDS = [f"{SAMPLE.name}:{i}" for i in range(48)]


def jsonl_args(out: Path, *extra: str) -> list[str]:
    return run_args(SAMPLE, out, *FAKE_ENGINE, "--rows-per-shard", "10", *extra)


def jsonl_rows(out: Path) -> list[dict]:
    """Every row of every JSONL file under OUT, as a line tool (`cat OUT/*/*.jsonl`) reads them."""
    lines = [
        line for p in sorted(out.glob("rank-*/*.jsonl")) for line in p.read_text().splitlines()
    ]
    return [json.loads(line) for line in lines]


def parquet_rows(out: Path) -> list[dict]:
    return [
        r for p in sorted(out.glob("rank-*/part-*.parquet")) for r in pq.read_table(p).to_pylist()
    ]


def assert_twins(out: Path) -> None:
    """Each Parquet shard has its JSONL file with the same rows in the same order, and no JSONL
    file is without its shard."""
    shards = sorted(p.with_suffix("") for p in out.glob("rank-*/part-*.parquet"))
    assert sorted(p.with_suffix("") for p in out.glob("rank-*/*.jsonl")) == shards
    for stem in shards:
        table = pq.read_table(stem.with_suffix(".parquet"))
        lines = [json.loads(x) for x in stem.with_suffix(".jsonl").read_text().splitlines()]
        assert [x["id"] for x in lines] == table.column("id").to_pylist()
        assert [x["text"] for x in lines] == table.column("text").to_pylist()
        keys = [k.hex() for k in table.column("request_key").to_pylist()]
        assert [x["request_key"] for x in lines] == keys
        assert list(lines[0]) == table.column_names
    assert not list(out.glob("rank-*/.tmp-*"))


def test_jsonl_output_is_the_parquet_rows_line_for_line(tmp_path):
    out = tmp_path / "out"
    run_cli(
        *jsonl_args(out, "--output-format", "jsonl", "--keep-prompt", "--logprobs", "1", "--n", "2")
    )
    assert_twins(out)
    rows = jsonl_rows(out)
    assert sorted((r["id"], r["sample_index"]) for r in rows) == sorted(
        (i, s) for i in IDS for s in range(2)
    )
    assert rows[0]["logprobs"][0]["top"][0]["token"].startswith("t")
    # What a JSON reader makes of them (pyarrow here; pandas.read_json(lines=True) alike).
    table = pajson.read_json(next(out.glob("rank-*/part-*-000000.jsonl")))
    assert table.num_rows == 10 and "prompt" in table.column_names
    # batchgen's own readers read the Parquet, unchanged.
    assert run_cli("status", out).exit_code == 0
    assert "96 committed rows in 10 shards" in run_cli("show", out).output


def test_a_kill_between_parquet_and_jsonl_then_resume_is_exactly_once(tmp_path):
    """SIGKILL after a shard's Parquet rename, before its JSONL (and its commit record), with a
    JSONL temporary file of a crashed write lying about: the resume adopts the shard, writes its
    JSONL, removes the temporary file, and the JSONL files hold every row once."""
    out = tmp_path / "out"
    victim = Victim(jsonl_args(out, "--output-format", "jsonl"), {PAUSE_ENV: "after_rename:2"})
    assert wait_until(victim.paused.is_set, victim, 120, "pause")
    assert victim.kill() == -signal.SIGKILL
    shard = out / "rank-00000" / victim.paused_at
    assert shard.exists() and not shard.with_suffix(".jsonl").exists()
    assert len(jsonl_rows(out)) == 10  # the first shard's, committed whole
    stray = shard.parent / ".tmp-part-00000-000002.jsonl.12345"
    stray.write_text('{"id": "half a line')

    result = run_cli(*jsonl_args(out, "--output-format", "jsonl"))
    assert f"adopted {shard.name} (10 rows), committed just before a crash" in result.output
    assert f"wrote {shard.with_suffix('.jsonl').name}, which a crash left out" in result.output
    assert f"removed an unfinished temporary file from a crash: {stray.name}" in result.output
    assert_twins(out)
    assert sorted(r["id"] for r in jsonl_rows(out)) == sorted(IDS)
    assert jsonl_rows(out) == [
        {**r, "request_key": r["request_key"].hex()} for r in parquet_rows(out)
    ]


def test_the_format_is_a_setting_of_the_run(tmp_path):
    """A resume cannot switch the format (some shards would lack their JSONL); --overwrite can,
    and leaves no JSONL file of the removed shards; a shard deleted by hand takes its JSONL with
    it when its rows are made again."""
    out = tmp_path / "out"
    run_cli(*jsonl_args(out))
    assert not list(out.glob("rank-*/*.jsonl"))
    refused = run_cli(*jsonl_args(out, "--output-format", "jsonl"), expect=1)
    assert "columns.format" in refused.output and "jsonl" in refused.output, refused.output
    run_cli(*jsonl_args(out, "--output-format", "jsonl", "--overwrite"))
    assert_twins(out)

    (out / "rank-00000" / "part-00000-000001.parquet").unlink()  # its rows are made again
    run_cli(*jsonl_args(out, "--output-format", "jsonl"))
    assert_twins(out)
    assert sorted(r["id"] for r in jsonl_rows(out)) == sorted(IDS)

    run_cli(*jsonl_args(out, "--overwrite"))
    assert not list(out.glob("rank-*/*.jsonl"))
    assert len(parquet_rows(out)) == 48


def test_try_refuses_an_output_format():
    result = run_cli("try", "hi", "--output-format", "jsonl", *FAKE_ENGINE, expect=2)
    assert "--output-format: batchgen try takes its one prompt" in result.output


def test_values_json_has_no_word_for():
    from pipeline.jsonl import json_value

    row = {"request_key": b"\x01\xab", "logprobs": [{"logprob": float("-inf"), "top": []}]}
    assert json_value(row) == {"request_key": "01ab", "logprobs": [{"logprob": None, "top": []}]}


def test_jsonl_beside_a_bucket_output_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL taken for a path would make a folder named "s3:" here
    result = run_cli(*jsonl_args("s3://bucket/out", "--output-format", "jsonl"), expect=2)
    assert (
        "--output-format jsonl with --output s3://bucket/out: JSON Lines copies are written "
        "beside local shards only"
    ) in result.output
    assert list(tmp_path.iterdir()) == []
