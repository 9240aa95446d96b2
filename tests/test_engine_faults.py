"""Engine deaths on the fake engine (the real engine's are in test_engine_faults_e2e.py): a row
that kills the engine each time it is in flight becomes the only error row; a passing death is
survived by a restart; past --engine-restarts, or with a broken engine, the run stops with the
cause named, commits what finished, and a rerun completes exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAKE_ENGINE, manifest_state, read_output, run_args, run_cli, write_prompts

from pipeline.engines.base import EngineDied
from pipeline.engines.fake import FakeEngine

ROWS = 120


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_prompts(tmp_path / "in.parquet", [f"Question {i}?" for i in range(ROWS)], 40)


def args(src: Path, out: Path, *extra: str) -> list[str]:
    return run_args(src, out, *FAKE_ENGINE, "--max-num-seqs", "8", "--rows-per-shard", "16", *extra)


def manifest(out: Path) -> dict:
    return manifest_state(out)


def dying(monkeypatch, method: str, should_die) -> list[int]:
    """Make the fake engine die in `method` ("_step", or "_add": found dead when a row is added,
    as vLLM's is when its engine process died since the last call) when `should_die(call
    number, queued rows)` says so. The call counter, which a test may move on."""
    real = getattr(FakeEngine, method)
    calls = [0]

    def call(self: FakeEngine, *args):
        calls[0] += 1
        if should_die(calls[0], [row for _, row in self._queue]):
            raise EngineDied("killed by SIGKILL (test)")
        return real(self, *args)

    monkeypatch.setattr(FakeEngine, method, call)
    return calls


def assert_exactly_once(out: Path) -> list[dict]:
    rows = read_output(out).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == ROWS
    return rows


def test_a_poison_row_alone_becomes_an_error_row_and_every_other_row_is_done(
    src, tmp_path, monkeypatch
):
    poison = "in.parquet:37"
    dying(monkeypatch, "_step", lambda n, queued: any(r.id == poison for r in queued))
    out = tmp_path / "out"
    result = run_cli(*args(src, out))
    rows = assert_exactly_once(out)
    errors = {r["id"]: r["error"] for r in rows if r["error"]}
    assert errors == {
        poison: "the engine died each time this row was in it (killed by SIGKILL (test)); left "
        "out so the other rows could run"
    }
    deaths = manifest(out)["report"]["engine_failures"]
    assert 2 <= len(deaths) <= 8 and all(d["restarted"] for d in deaths)
    assert deaths[0]["isolating"] is False and deaths[-1]["in_flight"] == 1
    assert f"row {poison} was in flight at " in result.output
    status = run_cli("status", out, expect=0).output
    assert f"engine died {len(deaths)} times in the last run, restarted {len(deaths)}" in status


@pytest.mark.parametrize(
    "where, call, in_flight",
    # Found at an add, the row being added never reached the engine: it is sent again after the
    # restart, not counted in flight (it used to be dropped, and the run ended "a batchgen bug").
    [("_step", 3, 32), ("_add", 20, 19)],
    ids=["at-a-step", "at-an-add"],
)
def test_a_passing_death_is_survived_by_a_restart_with_no_error_row(
    src, tmp_path, monkeypatch, where, call, in_flight
):
    dying(monkeypatch, where, lambda n, queued: n == call)
    out = tmp_path / "out"
    result = run_cli(*args(src, out))
    rows = assert_exactly_once(out)
    assert not [r for r in rows if r["error"]]
    assert (
        f"the engine died (killed by SIGKILL (test)) with {in_flight} request(s) in flight; "
        "restarting" in result.output
    )
    assert [d["isolating"] for d in manifest(out)["report"]["engine_failures"]] == [False]


def test_a_poison_row_found_at_adds_and_steps_alone_is_the_only_error_row(
    src, tmp_path, monkeypatch
):
    # As on vLLM: the engine dies on a row after it was added, and the death is found by the
    # next call, an add (while a group is being isolated too) or a step.
    poison = "in.parquet:37"
    in_engine = lambda n, queued: any(r.id == poison for r in queued)  # noqa: E731
    dying(monkeypatch, "_add", in_engine)
    dying(monkeypatch, "_step", in_engine)
    out = tmp_path / "out"
    run_cli(*args(src, out))
    rows = assert_exactly_once(out)
    assert [r["id"] for r in rows if r["error"]] == [poison]


def test_no_restarts_allowed_stops_at_the_first_death_and_a_rerun_completes(
    src, tmp_path, monkeypatch
):
    steps = dying(monkeypatch, "_step", lambda n, queued: n == 4)
    out = tmp_path / "out"
    result = run_cli(*args(src, out, "--engine-restarts", "0"), expect=1)
    last = result.output.splitlines()[-1]
    assert last.startswith(
        "Error: the engine died (killed by SIGKILL (test)) 1 time(s) this run, more than "
        "--engine-restarts 0 allows; "
    ), last
    assert last.endswith("are safe; rerun the same command to resume"), last
    state = manifest(out)
    assert state["status"] == "failed" and 0 < sum(s["prompts"] for s in state["shards"]) < ROWS
    assert run_cli("status", out, expect=4)
    steps[0] = 10**9  # the engine is well again
    run_cli(*args(src, out, "--engine-restarts", "0"))
    assert_exactly_once(out)


def test_a_broken_engine_is_given_up_after_two_rows_alone_not_every_row(src, tmp_path, monkeypatch):
    dying(monkeypatch, "_step", lambda n, queued: n >= 2)  # every step after the first
    out = tmp_path / "out"
    result = run_cli(*args(src, out, "--engine-restarts", "5"), expect=1)
    assert "the engine, not those rows, looks broken" in result.output.splitlines()[-1]
    errors = [r for r in read_output(out).to_pylist() if r["error"]]
    assert len(errors) <= 2


# --- an engine that does not start --------------------------------------------------------

# What vLLM 0.32's engine log holds when its engine core dies starting (abridged from a real
# one: the worker's exception, then the lines that only point back at it).
FAILED_START_LOG = """\
(EngineCore pid=5212) INFO 12-02 10:35:01 [core.py:101] Initializing a V1 LLM engine
(Worker pid=5232) ERROR 12-02 10:35:05 [multiproc_executor.py:953] Traceback (most recent call last):
(Worker pid=5232) ERROR 12-02 10:35:05 [multiproc_executor.py:953]     self._ngram_pinned_idx_buf = torch.zeros(
(Worker pid=5232) ERROR 12-02 10:35:05 [multiproc_executor.py:953] RuntimeError: pin_memory=True requires a CUDA or other accelerator backend; no pinned memory allocator is available on this system.
Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""  # noqa: E501


def test_a_failed_engine_start_names_the_cause_from_its_log_and_the_log(tmp_path: Path) -> None:
    from pipeline.engines.logs import start_failure

    log = tmp_path / "engine-rank-00000.log"
    # An earlier run's error in the same (appended) log is not this start's cause.
    earlier = "ValueError: an earlier run's problem\n"
    log.write_text(earlier + FAILED_START_LOG)
    exc = RuntimeError("Engine core initialization failed. See root cause above.")
    assert start_failure(exc, log, len(earlier)) == (
        "vLLM's engine failed to start: RuntimeError: Engine core initialization failed. See "
        "root cause above.; the cause, from its log: RuntimeError: pin_memory=True requires a "
        "CUDA or other accelerator backend; no pinned memory allocator is available on this "
        f"system.; vLLM's own log: {log}; check the engine flags it names (--engine-arg, "
        "--max-model-len, --max-num-seqs, memory settings) or the model"
    )
    # Without this start's lines the log names no cause; without a log, the output above does.
    assert "the cause" not in start_failure(exc, log, log.stat().st_size)
    assert start_failure(ValueError("bad"), None).startswith(
        "vLLM's engine failed to start: ValueError: bad; vLLM's output above; check"
    )
