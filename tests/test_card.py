"""The dataset card: a finished output folder is a Hugging Face dataset as it is."""

from __future__ import annotations

import shutil

import datasets
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import FAKE_ENGINE, SAMPLE, read_output, run_args, run_cli

from pipeline.card import DATA_FILES_PATTERN


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


@pytest.fixture
def finished(tmp_path):
    """The sample, 48 prompts x 2 samples, sampled, in 5 shards, on the fake engine."""
    out = tmp_path / "out"
    args = ["--temperature", "0.7", "--seed", "3", "--n", "2", "--rows-per-shard", "20", "--card"]
    run_cli(*run_args(SAMPLE, out, *FAKE_ENGINE, *args))
    return out


def test_a_finished_run_writes_a_card_that_load_dataset_follows(finished, hf_offline):
    card = (finished / "README.md").read_text()
    front = _front_matter(card)
    assert front["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "**/*.parquet"}]}
    ]
    assert list(front["dataset_info"]) == ["features"]
    # batchgen's own files must not be read as data: its state folder, a temporary shard.
    shard = sorted(finished.glob("rank-*/part-*.parquet"))[0]
    shutil.copy(shard, finished / ".batchgen" / "stray.parquet")
    shutil.copy(shard, shard.parent / f".tmp-{shard.name}.123")
    shutil.copy(shard, shard.parent / f".tmp-{shard.stem}.parquet")
    ds = datasets.load_dataset(str(finished), split="train")
    expected = pq.read_table(sorted(finished.glob("rank-*/part-*.parquet")))
    assert ds.num_rows == expected.num_rows == 96
    keys = sorted(zip(ds["id"], ds["sample_index"], strict=True))
    assert keys == sorted(
        (f"sample-{i:03d}", s) for i in range(48) for s in (0, 1)
    ) or keys == sorted(
        zip(
            expected.column("id").to_pylist(),
            expected.column("sample_index").to_pylist(),
            strict=True,
        )
    )
    assert len(set(keys)) == 96
    card_features = datasets.Features._from_yaml_list(front["dataset_info"]["features"])
    assert ds.features == card_features
    assert card_features == datasets.Features.from_arrow_schema(
        pq.read_schema(shard).remove_metadata()
    )


def test_no_card_without_the_flag(tmp_path):
    """Without --card the folder holds only Parquet beside the hidden state: pyarrow and
    pandas read it whole (README.md would break `pq.read_table(OUT)`)."""
    out = tmp_path / "out"
    run_cli(*run_args(SAMPLE, out, *FAKE_ENGINE))
    assert not (out / "README.md").exists()
    assert read_output(out).num_rows == 48


def test_the_card_names_model_sampling_and_counts(finished):
    card = (finished / "README.md").read_text()
    assert "- **Model**: `" in card and "SmolLM2-135M-Instruct" in card
    assert "config.json sha256 `" in card  # the model's file digests
    assert "temperature=`0.7`" in card and "n=`2`" in card
    assert "seed=`3`" in card and "engine=`fake`" in card
    assert "- **Counts**: 96 rows from 48 prompts of 48, 0 error rows," in card
    assert "- **batchgen**: 0.1.0" in card
    assert '"max_tokens": 8' in card  # the job config
    assert "AWS_" not in card


def test_the_pattern_matches_one_folder_per_rank(finished, hf_offline):
    """Shards live in one folder per rank (OUT/rank-XXXXX/*.parquet): the card's pattern
    reaches into them and finds every row."""
    assert DATA_FILES_PATTERN == "**/*.parquet"
    assert not list(finished.glob("*.parquet"))
    assert [p.name for p in finished.iterdir() if p.is_dir() and p.name.startswith("rank-")] == [
        "rank-00000"
    ]
    assert datasets.load_dataset(str(finished), split="train").num_rows == 96


def test_card_command_rewrites_the_card(finished):
    original = (finished / "README.md").read_text()
    (finished / "README.md").unlink()
    result = run_cli("card", finished)
    assert result.output == f"{finished / 'README.md'}\n"
    assert (finished / "README.md").read_text() == original


def test_card_command_on_a_folder_without_a_run(tmp_path):
    result = run_cli("card", tmp_path, expect=1)
    assert result.output == (
        f"Error: {tmp_path}: no batchgen run there (no .batchgen/rank-*/); give the "
        "--output folder of a run\n"
    )
