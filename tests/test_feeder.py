"""The feeder thread against a consumer slower than the input: every row arrives, exactly once."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import PromptConfig
from pipeline.engine import StopFlags
from pipeline.models import ensure_bundled_model
from pipeline.prompts import PromptBuilder, load_tokenizer
from pipeline.runner import Feeder
from pipeline.sources import ParquetSource


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder(
        PromptConfig(prompt_column="prompt"), load_tokenizer(str(ensure_bundled_model()))
    )


def test_a_busy_engine_at_the_end_of_the_input_loses_no_rows(
    tmp_path: Path, builder: PromptBuilder
) -> None:
    """The input ends while the feeder's queue is full and the engine takes more than the
    feeder's 0.1 s put timeout to make room: the end marker must wait, not evict a batch (which
    once let a run finish "complete" without those rows)."""
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"row {i}" for i in range(24)]}), src)
    flags = StopFlags()
    feeder = Feeder(ParquetSource(str(src)), builder, set(), None, flags, batch_rows=4, depth=2)
    feeder.start()
    got = []
    for row in feeder.feed():
        if row is not None:
            got.append(row.id)
            time.sleep(0.05)  # 0.2 s per batch of 4: the queue stays full at the end
    feeder.join(timeout=5)
    assert got == [f"in.parquet:{i}" for i in range(24)]
    assert feeder.exhausted and feeder.error is None


def test_a_stopped_run_ends_the_feeder_even_with_a_full_queue(
    tmp_path: Path, builder: PromptBuilder
) -> None:
    """Once the run stops, nobody reads the queue: the feeder must still end (rows it drops
    were never committed, so a resume redoes them)."""
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"row {i}" for i in range(40)]}), src)
    flags = StopFlags()
    feeder = Feeder(ParquetSource(str(src)), builder, set(), None, flags, batch_rows=4, depth=2)
    feeder.start()
    deadline = time.monotonic() + 5
    while not feeder.queue.full() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert feeder.queue.full()
    flags.stop.set()
    feeder.join(timeout=5)
    assert not feeder.is_alive()
    assert not feeder.exhausted
