"""Fault injection for tests, installed by the tests' own launcher (`HOOKED_BATCHGEN` in
conftest.py), never by batchgen itself: `batchgen` as users run it reads none of this.

  BATCHGEN_FAKE_STEP_SECONDS=0.05   each fake-engine step takes this long, so a signal or a kill
                                    lands in the middle of a run
  BATCHGEN_TEST_PAUSE=in_write:3    the 3rd shard this process commits announces itself on
  BATCHGEN_TEST_PAUSE=after_rename:3  stderr and hangs, written under its temporary name
                                    (in_write) or renamed but not yet in the manifest
                                    (after_rename), so a test can SIGKILL it exactly there
  BATCHGEN_TEST_PAUSE=engine_start  the fake engine's start announces itself and hangs, so a
                                    test can signal a run before its generation begins
  BATCHGEN_TEST_STORE_DEADLINE=3    object-store calls give up (StoreDown) after 3 s of
                                    failures instead of minutes
  BATCHGEN_TEST_GRANDCHILD=2        the rank with --rank 2 starts a `sleep` child in its
                                    session, announced on stderr, standing for vLLM's engine
                                    core (which a killed rank leaves behind)

The ranks that `--data-parallel` starts are started through this launcher too, so they carry the
same hooks (the variables above reach them through their environment).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

STEP_ENV = "BATCHGEN_FAKE_STEP_SECONDS"
PAUSE_ENV = "BATCHGEN_TEST_PAUSE"
GRANDCHILD_ENV = "BATCHGEN_TEST_GRANDCHILD"
STORE_DEADLINE_ENV = "BATCHGEN_TEST_STORE_DEADLINE"
PAUSE_POINTS = ("in_write", "after_rename", "engine_start")


def install() -> None:
    """Wrap the fake engine's step and the shard writer's rename as the environment asks, and
    start --data-parallel's ranks through this launcher."""
    from pipeline import launch

    launch.rank_command = lambda: [sys.executable, str(Path(__file__).resolve())]
    step = float(os.environ.get(STEP_ENV) or 0)
    if step:
        from pipeline.engines.fake import FakeEngine

        fake_step = FakeEngine._step

        def slow_step(self: FakeEngine):
            time.sleep(step)
            return fake_step(self)

        FakeEngine._step = slow_step
    spec = os.environ.get(PAUSE_ENV)
    if spec == "engine_start":
        _pause_at_engine_start()
    elif spec:
        point, _, nth = spec.partition(":")
        assert point in PAUSE_POINTS and nth.isdigit(), f"{PAUSE_ENV}={spec!r}"
        _pause_at_commit(point, int(nth))
    deadline = os.environ.get(STORE_DEADLINE_ENV)
    if deadline:
        from pipeline.storage.retry import RetryPolicy

        RetryPolicy.__init__.__defaults__ = (0.2, 1.0, float(deadline), True)
    rank = os.environ.get(GRANDCHILD_ENV)
    if rank is not None and _rank() == rank:
        child = subprocess.Popen(["sleep", "600"])
        print(f"{GRANDCHILD_ENV} pid {child.pid}", file=sys.stderr, flush=True)


def _rank() -> str | None:
    for i, arg in enumerate(sys.argv[:-1]):
        if arg in ("--rank", "--shard-index"):
            return sys.argv[i + 1]
    return None


def _pause_at_engine_start() -> None:
    from pipeline.engines.fake import FakeEngine

    init = FakeEngine.__init__

    def pausing_init(self: FakeEngine, *args, **kwargs) -> None:
        _hang("engine_start", "")
        init(self, *args, **kwargs)

    FakeEngine.__init__ = pausing_init


def _pause_at_commit(point: str, nth: int) -> None:
    from pipeline.sinks import ParquetShardWriter

    publish = ParquetShardWriter._publish
    commits = 0

    def pausing_publish(self: ParquetShardWriter, tmp: Path, final: Path) -> None:
        nonlocal commits
        commits += 1
        if point == "in_write" and commits == nth:
            _hang(point, final.name)
        publish(self, tmp, final)
        if point == "after_rename" and commits == nth:
            _hang(point, final.name)

    ParquetShardWriter._publish = pausing_publish


def _hang(point: str, shard: str) -> None:
    print(f"{PAUSE_ENV} {point} {shard}".rstrip(), file=sys.stderr, flush=True)
    time.sleep(600)


if __name__ == "__main__":  # the hooked launcher: `python tests/hooks.py run ...`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    install()
    from pipeline.cli import main

    sys.argv[0] = "batchgen"
    main()
