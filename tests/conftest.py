"""Shared fixtures. The real engine is started once per test session (pipeline.engine caches it
by its settings), so every engine test passes the same REAL_ENGINE flags."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "prompts.parquet"
BATCHGEN = Path(sys.executable).with_name("batchgen")
# float32 so the fidelity test can compare with Transformers' own float32 generate exactly.
REAL_ENGINE = ["--dtype", "float32", "--max-model-len", "512"]
FAKE_ENGINE = ["--engine", "fake"]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def run_cli(*args: str | Path, expect: int | None = 0):
    """Invoke `batchgen` in-process; assert the exit code unless `expect` is None."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, result.output
    return result


def run_subprocess(*args: str | Path, timeout: float = 600, env: dict | None = None):
    """Run the installed `batchgen` console script as a user would."""
    return subprocess.run(
        [str(BATCHGEN), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def read_output(out: Path) -> pa.Table:
    """The whole output folder as one table, the way pyarrow/pandas readers see it."""
    return pads.dataset(str(out), format="parquet").to_table()


def write_prompts(path: Path, prompts: list[str | None], **extra: list) -> Path:
    pq.write_table(pa.table({"prompt": prompts, **extra}), path)
    return path


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    """200 short distinct prompts in a 4-row-group Parquet file."""
    prompts = [f"Write one sentence about the number {i}." for i in range(200)]
    table = pa.table({"prompt": prompts, "topic": [f"t{i % 7}" for i in range(200)]})
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=50)
    return path
