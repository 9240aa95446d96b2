"""The Python API, `pipeline.run`: the config dataclasses in, the run's summary out, the same
output as `batchgen run` with the equivalent flags (fake engine: this is about the plumbing)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAKE_ENGINE, read_output, run_cli

from pipeline import run
from pipeline.config import EngineConfig, OutputConfig, PromptConfig, SourceConfig
from pipeline.errors import ConfigError
from pipeline.sampling import SamplingConfig


def _run(prompts_file: Path, out: Path, **settings):
    return run(
        SourceConfig(parquet=str(prompts_file)),
        PromptConfig(prompt_column="prompt", chat=True),
        OutputConfig(path=str(out), rows_per_shard=64),
        engine=EngineConfig(backend="fake"),
        sampling=SamplingConfig.of(max_tokens=16),
        **settings,
    )


def test_run_returns_the_summary_and_writes_what_the_cli_writes(prompts_file, tmp_path):
    result = _run(prompts_file, tmp_path / "api")
    assert (result.status, result.out_dir) == ("finished", tmp_path / "api")
    assert result.report["committed"]["rows"] == 200
    run_cli(
        "run",
        *FAKE_ENGINE,
        *("--parquet", prompts_file, "--prompt-column", "prompt", "--chat"),
        *("--max-tokens", "16", "--rows-per-shard", "64", "-o", tmp_path / "cli"),
    )
    columns = ["id", "sample_index", "text", "finish_reason", "completion_tokens"]
    api = read_output(tmp_path / "api").select(columns).sort_by("id")
    cli = read_output(tmp_path / "cli").select(columns).sort_by("id")
    assert api.num_rows == 200
    assert api.equals(cli)


def test_a_rerun_is_a_noop_and_a_rank_is_a_setting(prompts_file, tmp_path):
    _run(prompts_file, tmp_path / "out")
    assert _run(prompts_file, tmp_path / "out").status == "noop"
    ranked = _run(prompts_file, tmp_path / "ranked", num_ranks=4, rank=3)
    assert ranked.report["committed"]["rows"] == 50


def test_a_bad_setting_raises_the_clis_message(prompts_file, tmp_path):
    with pytest.raises(ConfigError, match=r"^--rank 4: must be in 0\.\.3 for --num-ranks 4$"):
        _run(prompts_file, tmp_path / "out", num_ranks=4, rank=4)
