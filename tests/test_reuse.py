"""--reuse and in-run deduplication on the fake engine: request keys, what is reused and what
is generated (counted by the engine's own accepted requests), folders that must not be trusted,
and exactly-once output through a SIGKILL, a resume, --overwrite and --data-parallel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAKE_ENGINE, HOOKED_BATCHGEN, manifest_state, read_output, run_cli
from hooks import STEP_ENV

from pipeline.records import PromptRow
from pipeline.reuse.index import BLOCK, KEY_DTYPE, MergedIndex, key_index_path
from pipeline.reuse.keys import RequestKeys

FINGERPRINT = {"model_files": {"config_sha256": "abc"}, "engine": "vllm", "dtype": "auto"}
OUTPUTS = ["id", "sample_index", "text", "finish_reason", "prompt_tokens", "completion_tokens"]


def row(**fields) -> PromptRow:
    base = {"id": "a", "seq": 0, "token_ids": [1, 2, 3], "sampling": {"max_tokens": 8}}
    return PromptRow(**{**base, **fields})


@pytest.mark.parametrize(
    "change, same",
    [
        ({"id": "b", "seq": 7, "passthrough": {"x": 1}}, True),  # the id is not the request
        ({"token_ids": [1, 2, 4]}, False),
        ({"seed": 5}, False),
        ({"max_tokens": 4}, False),
        ({"adapter": "sql"}, False),
        ({"sampling": {"max_tokens": 9}}, False),
        ({"sampling": {"max_tokens": 8, "json_schema": {"type": "object"}}}, False),
        ({"sampling": {"max_tokens": 8, "json_schema_column": "schema"}}, True),  # a name only
    ],
)
def test_a_request_key_covers_exactly_what_the_engine_is_sent(change, same):
    keys = RequestKeys(FINGERPRINT)
    assert len(keys.key(row())) == 16
    assert (keys.key(row()) == keys.key(row(**change))) is same


@pytest.mark.parametrize(
    "field, value", [("model_files", {"config_sha256": "def"}), ("dtype", "float32")]
)
def test_a_request_key_covers_the_model_and_engine_settings(field, value):
    assert RequestKeys(FINGERPRINT).key(row()) != RequestKeys({**FINGERPRINT, field: value}).key(
        row()
    )
    # Settings that name things (the input, ranks) do not enter it.
    other = {**FINGERPRINT, "input": {"files": ["x"]}, "num_shards": 8, "shard_index": 3}
    assert RequestKeys(FINGERPRINT).key(row()) == RequestKeys(other).key(row())


@pytest.mark.parametrize("budget", [1 << 21, 40])  # 40: most buckets are split again
def test_the_merged_index_finds_every_key_of_every_shard_and_nothing_else(tmp_path, budget):
    rng = np.random.default_rng(0)
    shards = [np.sort(np.frombuffer(rng.bytes(16 * 5000), dtype=KEY_DTYPE)) for _ in range(3)]
    shards.append(shards[2][:1000])  # keys in two shards: the first shard listed wins
    index = MergedIndex.build(
        tmp_path / "idx",
        ((k, np.arange(len(k), dtype=np.uint32) * 2) for k in shards),
        budget=budget,
    )
    assert index.size == 15000  # one entry per distinct key
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["entries.bin", "fence.bin"]
    missing = np.frombuffer(rng.bytes(16 * 50), dtype=KEY_DTYPE)
    edges = np.array([b"\x00" * 16, b"\xff" * 16], dtype=KEY_DTYPE)  # below and above all
    for wanted_shard in (0, 2):
        wanted = np.concatenate([shards[wanted_shard][::7], missing, edges])
        found, locs = index.lookup(wanted)
        hits = len(shards[wanted_shard][::7])
        assert found.tolist() == [True] * hits + [False] * 52
        assert locs["shard"].tolist() == [wanted_shard] * hits
        assert locs["row"].tolist() == [2 * i for i in range(0, 5000, 7)]
    index.close()


def test_a_lookup_reads_blocks_and_holds_no_page_of_the_index(tmp_path):
    keys = np.sort(np.frombuffer(np.random.default_rng(1).bytes(16 * 20000), dtype=KEY_DTYPE))
    index = MergedIndex.build(tmp_path / "idx", iter([(keys, np.arange(20000, dtype=np.uint32))]))
    assert len(index.fence) == -(-20000 // BLOCK)  # one key in memory per block on disk
    assert index.fence.tolist() == keys[::BLOCK].tolist()
    found, locs = index.lookup(keys[::-1].copy())  # in any order
    assert found.all() and locs["row"].tolist() == list(range(19999, -1, -1))
    index.close()


def questions(path: Path, n: int, edited: tuple[int, ...] = (), repeat: int = 1) -> Path:
    ids = [f"q{i:03d}" for i in range(n)]
    prompts = [f"Question {i // repeat}{' (edited)' if i in edited else ''}?" for i in range(n)]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), path)
    return path


def args(src: Path, out: Path, *extra: str) -> list[str]:
    return [
        "run", "--parquet", src, "--prompt-column", "prompt", "--id-column", "id",
        "--max-tokens", "8", "--rows-per-shard", "7", *FAKE_ENGINE, *extra, "--output", out,
    ]  # fmt: skip


def reuse_report(out: Path, rank: int = 0) -> dict:
    return manifest_state(out, rank)["report"]["this_run"]["reuse"]


def by_id(out: Path, columns: list[str] = OUTPUTS) -> dict[str, dict]:
    table = read_output(out).select([*columns, "reused_from"]).to_pylist()
    ids = [r["id"] for r in table]
    assert len(ids) == len(set(ids)), "a row written twice"
    return {r["id"]: r for r in table}


@pytest.fixture
def night1(tmp_path: Path) -> Path:
    out = tmp_path / "night1"
    run_cli(*args(questions(tmp_path / "n1.parquet", 40), out))
    assert reuse_report(out)["engine_requests"] == 40
    return out


def test_a_grown_dataset_generates_only_its_new_rows(tmp_path, night1):
    out = tmp_path / "night2"
    result = run_cli(*args(questions(tmp_path / "n2.parquet", 60), out, "--reuse", night1))
    report = reuse_report(out)
    assert report["engine_requests"] == 20  # the engine's own count
    assert (report["generated_prompts"], report["reused_prompts"]) == (20, 40)
    assert f"20 prompts generated, 40 reused from {night1}" in result.output
    old, new = by_id(night1), by_id(out)
    assert sorted(new) == [f"q{i:03d}" for i in range(60)]
    for i, old_row in old.items():
        assert {k: new[i][k] for k in OUTPUTS} == {k: old_row[k] for k in OUTPUTS}
        assert new[i]["reused_from"].startswith(str(night1) + "/rank-00000/part-00000-")
    assert all(new[f"q{i:03d}"]["reused_from"] is None for i in range(40, 60))
    # The request keys of the reused rows are the earlier run's.
    old_keys, new_keys = by_id(night1, ["id", "request_key"]), by_id(out, ["id", "request_key"])
    assert all(new_keys[i]["request_key"] == r["request_key"] for i, r in old_keys.items())


def test_edited_prompts_are_generated_again(tmp_path, night1):
    out = tmp_path / "night3"
    run_cli(*args(questions(tmp_path / "n3.parquet", 40, edited=(3, 9)), out, "--reuse", night1))
    report = reuse_report(out)
    assert (report["engine_requests"], report["reused_prompts"]) == (2, 38)
    assert by_id(out)["q003"]["text"] != by_id(night1)["q003"]["text"]


def test_plan_counts_the_reused_rows_before_any_engine_time(tmp_path, night1):
    src = questions(tmp_path / "n2.parquet", 60)
    result = run_cli("plan", *args(src, tmp_path / "planned", "--reuse", night1)[1:], "--json")
    todo = json.loads(result.output.splitlines()[-1])["all"]["todo"]
    assert (todo["reused_prompts"], todo["generate_prompts"]) == (40, 20)
    assert not (tmp_path / "planned").exists()


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--max-tokens", "9"], "sampling.max_tokens: 8 -> 9"),
        (["--dtype", "float32"], "dtype: auto -> float32"),
        (["--temperature", "0.8"], "sampling.temperature"),
    ],
)
def test_a_folder_made_with_other_settings_reuses_nothing_and_says_which(
    tmp_path, night1, flags, field
):
    out = tmp_path / "other"
    result = run_cli(*args(questions(tmp_path / "n1.parquet", 40), out, *flags, "--reuse", night1))
    lines = [line for line in result.output.splitlines() if "--reuse" in line]
    assert len(lines) == 1 and "made with other output-changing settings (" + field in lines[0]
    assert lines[0].endswith("reuses nothing")
    assert reuse_report(out)["engine_requests"] == 40


@pytest.mark.parametrize("damage", ["no index", "index of another shard", "not a shard"])
def test_an_unreadable_or_partial_folder_is_reported_and_skipped(tmp_path, night1, damage):
    shards = sorted(night1.glob("rank-*/part-*.parquet"))
    if damage == "no index":
        key_index_path(shards[2]).unlink()
    elif damage == "index of another shard":
        key_index_path(shards[-1]).replace(key_index_path(shards[0]))
    else:
        shards[0].write_bytes(b"not parquet")
    out = tmp_path / "after"
    result = run_cli(*args(questions(tmp_path / "n1.parquet", 40), out, "--reuse", night1))
    report = reuse_report(out)
    assert report["engine_requests"] == 40 and report["reused_prompts"] == 0
    assert len(report["skipped"]) == 1 and report["skipped"][0].endswith("skipped")
    assert report["skipped"][0] in result.output


def test_a_folder_made_with_another_model_reuses_nothing_and_says_so(tmp_path, night1):
    record = json.loads((night1 / ".batchgen" / "job.json").read_text())
    record["fingerprint"]["model_files"] = {"config_sha256": "another model"}
    (night1 / ".batchgen" / "job.json").write_text(json.dumps(record))
    out = tmp_path / "other"
    result = run_cli(*args(questions(tmp_path / "n1.parquet", 40), out, "--reuse", night1))
    lines = [line for line in result.output.splitlines() if "--reuse" in line]
    assert len(lines) == 1, lines
    assert "made with other output-changing settings (model_files" in lines[0]
    assert "another model" in lines[0] and lines[0].endswith("reuses nothing")
    assert reuse_report(out)["engine_requests"] == 40


@pytest.mark.parametrize(
    "damage, says",
    [
        ("no job record", "has no readable job record (.batchgen/job.json); skipped"),
        ("garbled job record", "job.json is unreadable ("),
        ("no shards", "holds no committed shards; nothing to reuse"),
        ("no folder", "no such folder; skipped"),
        ("a file", "no such folder; skipped"),
    ],
)
def test_a_folder_without_its_record_or_shards_is_reported_in_one_line(
    tmp_path, night1, damage, says
):
    folder = night1
    if damage == "no job record":
        (night1 / ".batchgen" / "job.json").unlink()
    elif damage == "garbled job record":
        (night1 / ".batchgen" / "job.json").write_text("{not json")
    elif damage == "no shards":
        for shard in night1.glob("rank-*/part-*.parquet"):
            shard.unlink()
    elif damage == "no folder":
        folder = tmp_path / "missing"
    else:
        folder = tmp_path / "file"
        folder.write_text("x")
    out = tmp_path / "after"
    result = run_cli(*args(questions(tmp_path / "n1.parquet", 40), out, "--reuse", folder))
    report = reuse_report(out)
    assert report["engine_requests"] == 40 and report["sources"] == []
    assert len(report["skipped"]) == 1 and says in report["skipped"][0]
    lines = [line for line in result.output.splitlines() if f"--reuse {folder}:" in line]
    assert len(lines) == 1 and says in lines[0]


def test_identical_greedy_requests_are_generated_once(tmp_path):
    out = tmp_path / "dups"
    src = questions(tmp_path / "d.parquet", 60, repeat=3)
    run_cli(*args(src, out, "--temperature", "0", "--max-num-seqs", "4"))
    report = reuse_report(out)
    assert report["engine_requests"] == 20
    assert (report["duplicate_prompts"], report["generated_prompts"]) == (40, 20)
    rows = by_id(out)
    assert len(rows) == 60
    for i in range(60):
        assert rows[f"q{i:03d}"]["text"] == rows[f"q{i - i % 3:03d}"]["text"]


def test_sampled_rows_with_their_own_seeds_are_never_merged(tmp_path):
    out = tmp_path / "sampled"
    src = questions(tmp_path / "d.parquet", 30, repeat=3)
    run_cli(*args(src, out, "--temperature", "0.8"))
    report = reuse_report(out)
    assert (report["engine_requests"], report["duplicate_prompts"]) == (30, 0)
    assert len({r["text"] for r in by_id(out).values()}) == 30


def test_overwrite_with_reuse_writes_every_row_once(tmp_path, night1):
    out = tmp_path / "night2"
    src = questions(tmp_path / "n2.parquet", 60)
    run_cli(*args(src, out, "--reuse", night1))
    run_cli(*args(src, out, "--reuse", night1, "--overwrite"))
    assert len(by_id(out)) == 60
    assert reuse_report(out)["reused_prompts"] == 40


def test_data_parallel_ranks_share_one_index_of_the_whole_folder(tmp_path, night1):
    out = tmp_path / "dp"
    src = questions(tmp_path / "n2.parquet", 60)
    result = run_cli(*args(src, out, "--reuse", night1, "--data-parallel", "2"))
    # One rank builds the folder's index, the other waits for it and uses it; neither leaves it.
    assert result.output.count("--reuse: built the index of 6 shards in") == 1
    assert result.output.count("--reuse: using the index another rank built in") == 1
    assert [p.suffix for p in (out / ".batchgen" / "reuse-index").iterdir()] == [".lock"]
    rows = by_id(out)
    assert sorted(rows) == [f"q{i:03d}" for i in range(60)]
    reports = [reuse_report(out, rank) for rank in (0, 1)]
    assert sum(r["reused_prompts"] for r in reports) == 40
    assert sum(r["engine_requests"] for r in reports) == 20
    status = json.loads(run_cli("status", out, "--json").output)
    assert status["all"]["last_run_reuse"]["reused_prompts"] == 40


def test_sigkill_then_resume_with_reuse_is_exactly_once(tmp_path, night1):
    out = tmp_path / "killed"
    src = questions(tmp_path / "n2.parquet", 60)
    cmd = [
        str(HOOKED_BATCHGEN),
        *map(str, args(src, out, "--reuse", night1, "--max-num-seqs", "1")),
    ]
    env = {**os.environ, STEP_ENV: "0.3"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(out.glob("rank-*/part-*.parquet"))) < 6:  # the 40 reused rows, then generating
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert len(read_output(out)) < 60
    run_cli(*args(src, out, "--reuse", night1))
    rows = by_id(out)
    assert sorted(rows) == [f"q{i:03d}" for i in range(60)]
    clean = tmp_path / "clean"
    run_cli(*args(src, clean, "--reuse", night1))
    assert {i: {k: r[k] for k in OUTPUTS} for i, r in rows.items()} == {
        i: {k: r[k] for k in OUTPUTS} for i, r in by_id(clean).items()
    }


def test_the_lookup_bench_finds_what_its_folder_holds(tmp_path):
    result = run_cli("bench", "--reuse-lookup", "25000", "--work-dir", tmp_path, "--json")
    report = json.loads(result.output[result.output.index("{") :])
    lookup = report["lookup"]
    assert report["rows"] == 25000
    assert (lookup["found"], lookup["mismatched"]) == (24750, 0)  # 99 in 100, all read back
    assert lookup["index_mb_on_disk"] == 0.6  # 24 bytes a request
    assert lookup["open_peak_rss_mb"] > 0 and lookup["lookup_peak_rss_mb"] > 0
    assert not (tmp_path / "index").exists()  # the run's index is removed at close
