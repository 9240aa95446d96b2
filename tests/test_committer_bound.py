"""The committer's intake is bounded: a committer slower than the engine slows the engine loop
down instead of letting results pile up in memory (bench --memory --logprobs 20 once grew to
4.2 GB at 1M rows with the instant fake engine)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

from pipeline.records import ResultRow
from pipeline.stages import Committer


class SlowWriter:
    """Takes 20 ms a shard and records how much was waiting for the committer meanwhile."""

    rank = 0
    out_dir = Path("unused")

    def __init__(self) -> None:
        self.committer: Committer | None = None
        self.rows = 0
        self.pending_seen: list[int] = []

    def write(self, rows: list[ResultRow], seq: int) -> SimpleNamespace:
        assert self.committer is not None
        self.pending_seen.append(self.committer._pending)
        time.sleep(0.02)
        self.rows += len(rows)
        return SimpleNamespace()


def rows_with_logprobs(start: int, count: int, k: int) -> list[ResultRow]:
    entry = (1, "a", -0.5, [(2, "b", -1.0)] * k)
    return [
        ResultRow(f"r{i}", i, 0, "x", "length", 3, 4, logprobs=[entry] * 4)
        for i in range(start, start + count)
    ]


def test_a_slow_committer_holds_the_producer_back_and_loses_nothing():
    writer = SlowWriter()
    checkpoint = SimpleNamespace(commit=lambda info: None)
    committer = Committer(writer, checkpoint, 0, rows_per_shard=10, checkpoint_seconds=60)
    committer.max_pending = 500  # a row here weighs 1 + 4 x (1 + 20) = 85
    writer.committer = committer
    committer.start()
    waited = 0.0
    for start in range(0, 400, 4):  # 100 puts of 4 rows: far faster than 20 ms a shard
        began = time.monotonic()
        committer.put(rows_with_logprobs(start, 4, 20))
        waited += time.monotonic() - began
        assert committer._pending <= committer.max_pending + 4 * 85
    committer.close()
    assert committer.error is None
    assert writer.rows == 400  # every row committed
    assert max(writer.pending_seen) <= committer.max_pending + 4 * 85
    assert waited > 0.2  # the producer was held back (40 shards at 20 ms each)
    assert committer._pending == 0


def test_put_does_not_wait_on_a_committer_that_is_not_running():
    committer = Committer(SlowWriter(), SimpleNamespace(), 0, 10, 60)
    committer.max_pending = 0
    done = threading.Event()
    threading.Thread(
        target=lambda: (committer.put(rows_with_logprobs(0, 50, 5)), done.set())
    ).start()
    assert done.wait(5)
