"""The output folder reads as one table in every reader the README names, while a shard is
being written and after, with batchgen's hidden state folder beside the shards."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAKE_ENGINE, run_args, run_cli, write_prompts

ROWS = 120


@pytest.fixture
def output(tmp_path: Path) -> Path:
    prompts = [f"prompt {i}" for i in range(ROWS)]
    src = write_prompts(tmp_path / "in.parquet", prompts, lang=["en", "fr", "de"] * (ROWS // 3))
    out = tmp_path / "out"
    flags = ["--rows-per-shard", "50", "--keep-columns", "lang", *FAKE_ENGINE]
    run_cli(*run_args(src, out, *flags, max_tokens=4))
    # What a crash mid-write leaves behind must not reach readers either.
    (out / "rank-00000" / ".tmp-part-00000-000009.parquet.999").write_bytes(b"PAR1 truncated")
    return out


EXPECTED_IDS = sorted(f"in.parquet:{i}" for i in range(ROWS))


def test_pyarrow_reads_the_folder(output):
    table = pq.read_table(output)
    assert sorted(table.column("id").to_pylist()) == EXPECTED_IDS
    assert table.schema.field("lang").type == pa.string()


def test_pandas_reads_the_folder(output):
    import pandas as pd

    frame = pd.read_parquet(output)
    assert sorted(frame["id"]) == EXPECTED_IDS
    assert frame["lang"].value_counts().to_dict() == {"en": 40, "fr": 40, "de": 40}


def test_duckdb_reads_the_shards(output):
    import duckdb

    rows = duckdb.sql(
        f"SELECT count(*), count(DISTINCT id), min(sample_index) FROM '{output}/*/*.parquet'"
    ).fetchall()
    assert rows == [(ROWS, ROWS, 0)]


def test_datasets_reads_the_folder(output, monkeypatch, tmp_path):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = datasets.load_dataset(
        "parquet", data_dir=str(output), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert sorted(ds["id"]) == EXPECTED_IDS
    assert set(ds.column_names) == {
        "id",
        "sample_index",
        "text",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "error",
        "request_key",
        "reused_from",
        "lang",
    }
