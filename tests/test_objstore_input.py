"""Inputs by URL: `--parquet s3://...` read from a real S3 server (SeaweedFS on loopback) by row
groups, globs on the store, and a store restarted mid-read."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seaweedfs
from conftest import FAKE_ENGINE, read_output, run_args, run_cli
from seaweedfs import BUCKET, fresh_prefix

from pipeline.errors import ConfigError
from pipeline.sources.parquet import ParquetSource
from pipeline.storage.files import RetryingReader
from pipeline.storage.retry import RetryPolicy

seaweed, s3 = seaweedfs.seaweed, seaweedfs.s3  # the server's fixtures


def _upload(server, prefix: str, files: dict[str, int], row_group: int = 7) -> None:
    """Parquet files of `n` prompts each under `prefix` (an s3:// URL), small row groups."""
    fs = server.fs()
    base = prefix.split("://", 1)[1]
    for name, n in files.items():
        table = pa.table({"prompt": [f"{name} prompt {i}" for i in range(n)]})
        with fs.open_output_stream(f"{base}/{name}") as out:
            pq.write_table(table, out, row_group_size=row_group)


def test_run_reads_parquet_from_the_bucket_every_row_once(s3, tmp_path):
    prefix = fresh_prefix()
    files = {"data/a.parquet": 23, "data/b.parquet": 17, "data/sub/c.parquet": 9}
    _upload(s3, prefix, {**files, "data/_meta.parquet": 5, "data/.tmp-x.parquet": 4})
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
    _upload(s3, prefix, {"x.parquet": 30, "y.parquet": 11})
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
    _upload(s3, prefix, {"big.parquet": 5000}, row_group=500)
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
    _upload(s3, prefix, {"r.parquet": 200_000}, row_group=10_000)
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
    _upload(s3, prefix, {"d/p0.parquet": 12, "d/p1.parquet": 8})
    out = tmp_path / "out"
    run_cli(
        "run", *FAKE_ENGINE, "--dataset", "parquet", "--data-files", f"{prefix}/d/*.parquet",
        "--prompt-column", "prompt", "--max-tokens", "4", "--output", out,
    )  # fmt: skip
    table = read_output(out)
    assert sorted(table.column("id").to_pylist()) == sorted(f"train:{i}" for i in range(20))
