"""Inputs by URL: `--parquet s3://...` read from a real S3 server (SeaweedFS on loopback) by row
groups, globs on the store, and a store restarted mid-read; the first case also on gs:// (a real
GCS JSON API server, fake-gcs-server)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import objstores
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAKE_ENGINE, HOOKED_BATCHGEN, read_output, run_args, run_cli
from hooks import STEP_ENV
from seaweedfs import BUCKET, fresh_prefix

from pipeline.errors import ConfigError
from pipeline.sources.parquet import ParquetSource
from pipeline.storage.files import RetryingReader
from pipeline.storage.retry import RetryPolicy

# The servers' fixtures; `store` runs a test on each of S3 and GCS.
seaweed, s3, fake_gcs, gcs = objstores.seaweed, objstores.s3, objstores.fake_gcs, objstores.gcs
store = objstores.store


def _upload(prefix: str, files: dict[str, int], row_group: int = 7) -> None:
    """Parquet files of `n` prompts each under `prefix` (a store URL), small row groups."""
    from pipeline.storage.store import ObjectStore

    objects = ObjectStore(prefix)
    for name, n in files.items():
        table = pa.table({"prompt": [f"{name} prompt {i}" for i in range(n)]})
        with objects.open_output(name) as out:
            pq.write_table(table, out, row_group_size=row_group)


def test_run_reads_parquet_from_the_bucket_every_row_once(store, tmp_path):
    prefix = store.fresh_prefix()
    files = {"data/a.parquet": 23, "data/b.parquet": 17, "data/sub/c.parquet": 9}
    _upload(prefix, {**files, "data/_meta.parquet": 5, "data/.tmp-x.parquet": 4})
    out = tmp_path / "out"
    run_cli(*run_args(f"{prefix}/data/*.parquet", out, *FAKE_ENGINE, "--rows-per-shard", "10"))
    ids = read_output(out).column("id").to_pylist()
    expected = [f"a.parquet:{i}" for i in range(23)] + [f"b.parquet:{i}" for i in range(17)]
    expected += [f"_meta.parquet:{i}" for i in range(5)]  # a glob matches '_' names, as locally
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    # A prefix is read recursively, skipping '.' and '_' names; `**` spans folders.
    deep = ParquetSource(f"{prefix}/data")
    assert [f.name for f in deep.files] == [
        "a.parquet",
        "b.parquet",
        "sub/c.parquet",
    ]
    assert deep.total_rows == 49 and deep.identity()["spec"] == f"{prefix}/data"
    assert [f.name for f in ParquetSource(f"{prefix}/**/c.parquet").files] == ["data/sub/c.parquet"]


def test_ranks_split_a_bucket_input_exactly(s3):
    prefix = fresh_prefix()
    _upload(prefix, {"x.parquet": 30, "y.parquet": 11})
    seen = []
    for rank in range(3):
        src = ParquetSource(f"{prefix}/*.parquet", 3, rank)
        for ids, cols in src.iter_batches(["prompt"], 4):
            seen += ids
            assert [c.split(" prompt ")[0] for c in cols["prompt"]] == [
                i.split(":")[0] for i in ids
            ]
    assert sorted(seen) == sorted(
        [f"x.parquet:{i}" for i in range(30)] + [f"y.parquet:{i}" for i in range(11)]
    )


def test_bucket_inputs_refused_in_one_line(s3):
    prefix = fresh_prefix()
    with pytest.raises(ConfigError, match=r"^--parquet s3://.*/\*\.parquet: matches no object;"):
        ParquetSource(f"{prefix}/*.parquet")
    with pytest.raises(
        ConfigError, match=r"^--parquet s3://nope-bucket/x: the bucket 'nope-bucket' does not exist"
    ):
        ParquetSource("s3://nope-bucket/x")


def test_parquet_read_survives_a_store_restart_mid_file(s3):
    prefix = fresh_prefix()
    _upload(prefix, {"big.parquet": 5000}, row_group=500)
    src = ParquetSource(f"{prefix}/big.parquet")
    batches = src.iter_batches(["prompt"], 500)
    seen = list(next(batches)[0])
    s3.kill()
    restarter = threading.Timer(1.5, s3.start)
    restarter.start()
    try:
        for ids, _cols in batches:
            seen += ids
    finally:
        restarter.join()
    assert seen == [f"big.parquet:{i}" for i in range(5000)]


def test_the_reader_fetches_ranges_not_the_whole_object(s3):
    prefix = fresh_prefix()
    _upload(prefix, {"r.parquet": 200_000}, row_group=10_000)
    fs, path = s3.fs(), f"{prefix.split('://')[1]}/r.parquet"
    size = fs.get_file_info(path).size
    reads = []
    reader = RetryingReader(fs, path, size, RetryPolicy(deadline_s=5))
    original = reader.read

    def counting(n=-1):
        data = original(n)
        reads.append(len(data))
        return data

    reader.read = counting
    pf = pq.ParquetFile(reader)
    assert pf.read_row_group(5).num_rows == 10_000
    assert size > 1_000_000 and sum(reads) < size / 5  # footer + one row group of 20
    assert BUCKET in path


def test_data_files_urls_reach_the_datasets_loader_with_the_store_credentials(
    s3, tmp_path, monkeypatch
):
    """(Not under HF_HUB_OFFLINE: `datasets` then refuses every remote URL, s3:// included.)"""
    pytest.importorskip("s3fs", reason="fsspec's s3:// needs s3fs (pip install s3fs)")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    prefix = fresh_prefix()
    _upload(prefix, {"d/p0.parquet": 12, "d/p1.parquet": 8})
    out = tmp_path / "out"
    run_cli(
        "run", *FAKE_ENGINE, "--dataset", "parquet", "--data-files", f"{prefix}/d/*.parquet",
        "--prompt-column", "prompt", "--max-tokens", "4", "--output", out,
    )  # fmt: skip
    table = read_output(out)
    assert sorted(table.column("id").to_pylist()) == sorted(f"train:{i}" for i in range(20))


def test_an_input_store_that_stays_down_ends_the_run_as_interrupted_then_resumes(s3, tmp_path):
    """The store dies mid-run for longer than the retries last: the run commits what it has and
    exits 75; rerun once the store is back, every row ends up in the output exactly once."""
    prefix = fresh_prefix()
    _upload(prefix, {"in.parquet": 60_000}, row_group=1000)
    out = tmp_path / "out"
    args = run_args(f"{prefix}/in.parquet", out, *FAKE_ENGINE, "--rows-per-shard", "200")
    env = {**os.environ, STEP_ENV: "0.05", "BATCHGEN_TEST_STORE_DEADLINE": "3"}
    proc = subprocess.Popen(
        [str(HOOKED_BATCHGEN), *args], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("rank-*/part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.1)
        s3.kill()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        s3.start()
    assert proc.returncode == 75, stderr
    assert "the store kept failing for" in stderr and "rerun the same command" in stderr
    status = json.loads(run_cli("status", out, "--json", expect=3).output)
    assert status["ranks"][0]["state"] == "interrupted"
    done = status["all"]["prompts"]
    assert 0 < done < 60_000
    run_cli(*args)
    ids = read_output(out).column("id").to_pylist()
    assert sorted(ids) == sorted(f"in.parquet:{i}" for i in range(60_000)) and len(set(ids)) == len(
        ids
    )


def test_the_source_streams_row_groups_not_the_whole_object(s3, monkeypatch):
    """Reading a rank's first batch fetches the footer and one row group, not every row group
    the rank owns (pyarrow's pre-buffering would fetch them all at once)."""
    prefix = fresh_prefix()
    _upload(prefix, {"s.parquet": 200_000}, row_group=10_000)
    fetched = []
    read = RetryingReader.read

    def counting(self, n=-1):
        data = read(self, n)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(RetryingReader, "read", counting)
    src = ParquetSource(f"{prefix}/s.parquet")
    size = src.files[0].size
    fetched.clear()
    ids, _ = next(src.iter_batches(["prompt"], 1000))
    assert ids[0] == "s.parquet:0" and size > 1_000_000
    assert sum(fetched) < size / 5, (sum(fetched), size)
