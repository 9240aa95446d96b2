"""The per-step summary of a torch profiler trace (pipeline/bench/steptrace.py), on traces
written here in torch's Chrome format: step periods from one marker's start to the next's, the
GPU's busy time as the union of its activity clipped to each period, the requests each step ran
from the marker's name. The real engine's trace is read end to end in test_bench.py."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from pipeline.bench import steptrace
from pipeline.bench.steptrace import (
    read_events,
    step_counts,
    summarize,
    trace_files,
    traced_pass,
    verdict,
)


def marker(name: str, ts: float, dur: float, pid: int = 7) -> dict:
    return {"ph": "X", "cat": "user_annotation", "name": name, "pid": pid, "tid": 1, "ts": ts,
            "dur": dur}  # fmt: skip


def kernel(ts: float, dur: float, stream: int = 7, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": "k", "pid": 0, "tid": stream, "ts": ts, "dur": dur}


# Three steps of 10 ms (4 markers); times in microseconds, as torch writes them.
STEPS = [
    marker("execute_new_2_cached_6", 0, 3000),
    marker("execute_new_0_cached_8", 10_000, 2000),
    marker("execute_new_0_cached_8", 20_000, 2000),
    marker("execute_new_1_cached_7", 30_000, 2500),
]


def test_a_gpu_busy_half_of_each_step_on_two_streams_with_overlap() -> None:
    events = [
        *STEPS,
        # step 1: 2-6 ms on one stream, 4-7 ms on another: a union of 5 ms, not 7
        kernel(2000, 4000),
        kernel(4000, 3000, stream=8),
        # step 2: a copy and a fill, 5 ms in all
        kernel(12_000, 2000, cat="gpu_memcpy"),
        kernel(15_000, 3000, cat="gpu_memset"),
        # step 3: a kernel running on past the step's end counts up to it only (3 ms of 6), and
        # the rest of it is not counted again: the trace ends with the last marker
        kernel(27_000, 6000),
        kernel(21_000, 2000),
        # not device activity: a CPU op and the GPU's mirror of an annotation
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 7, "tid": 1, "ts": 1, "dur": 9000},
        {
            "ph": "X",
            "cat": "gpu_user_annotation",
            "name": "execute_x",
            "pid": 0,
            "tid": 7,
            "ts": 0,
            "dur": 30_000,
        },  # fmt: skip
    ]
    s = summarize(events)
    assert s["steps"] == 3
    assert s["step_ms"] == {"median": 10.0, "p10": 10.0, "p90": 10.0}
    assert s["execute_ms"]["median"] == 2.0
    assert s["execute_share"] == pytest.approx(7 / 30, abs=1e-3)
    assert s["gpu_busy_ms"]["median"] == 5.0
    assert s["gpu_busy_share"] == 0.5
    assert s["requests_per_step"]["median"] == 8.0
    assert s["tokens_per_step"] is None  # the old names count requests only
    assert verdict(s).endswith("GPU busy 50% of the steps' time: host-bound")


def test_a_cpu_engine_trace_has_steps_and_no_gpu_figures() -> None:
    s = summarize(STEPS)
    assert s["steps"] == 3 and s["gpu_events"] == 0
    assert s["gpu_busy_share"] is None and s["gpu_busy_ms"] is None
    assert "no device activity in the trace (a CPU engine, or no CUDA profiling)" in verdict(s)


def test_a_busy_gpu_is_gpu_bound() -> None:
    events = [*STEPS, kernel(0, 30_000)]
    s = summarize(events)
    assert s["gpu_busy_share"] == 1.0
    assert verdict(s).endswith("GPU-bound")


def test_steps_are_those_of_the_process_with_most_markers() -> None:
    """With tensor parallelism each rank traces its own steps; one rank's are the steps (the
    other's would interleave with them and halve every period)."""
    other = [marker("execute_new_0_cached_8", t, 100, pid=9) for t in (5000, 15_000, 25_000)]
    s = summarize([*STEPS, *other[:2]])
    assert s["steps"] == 3 and s["step_ms"]["median"] == 10.0


@pytest.mark.parametrize(
    ("name", "counts"),
    [
        ("execute_new_3_cached_250", (253, None)),
        ("execute_context_23(1519)_generation_1(1)", (24, 1520)),
        ("execute_context_0(0)_generation_24(24)", (24, 24)),
        ("execute_context_0_generation_64", (64, None)),
        ("execute_model", (None, None)),
    ],
)
def test_requests_and_tokens_from_the_marker_name(
    name: str, counts: tuple[int | None, int | None]
) -> None:
    assert step_counts(name) == counts


def test_fewer_than_two_markers_are_no_steps() -> None:
    s = summarize(STEPS[:1])
    assert s == {"steps": 0, "gpu_events": 0}
    assert verdict(s) == "no engine steps in the trace"


def write_trace(path: Path, events: list[dict]) -> Path:
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return path


def test_a_traced_pass_files_each_new_trace_under_its_side(tmp_path: Path) -> None:
    """A side of two replicas writes two traces: each is moved under the side's folder and
    summarized; a trace already there (the other side's, written before) and a file that is
    not a trace are left alone."""
    old = write_trace(tmp_path / "rank0.1.pt.trace.json.gz", STEPS[:2])
    os.utime(old, (1, 1))
    (tmp_path / "rank0.profiler_out.txt").write_text("a table")

    def run() -> None:  # as two engines' profilers would, each writing a trace on its stop
        write_trace(tmp_path / "rank0.2.pt.trace.json.gz", STEPS)
        (tmp_path / "rank0.3.pt.trace.json").write_text(json.dumps({"traceEvents": STEPS[:3]}))

    got = traced_pass(tmp_path, "batchgen x2", run, skip=4)
    assert sorted((s["trace"], s["steps"]) for s in got) == [
        ("batchgen x2/rank0.2.pt.trace.json.gz", 3),
        ("batchgen x2/rank0.3.pt.trace.json", 2),
    ]
    assert sorted(p.name for p in (tmp_path / "batchgen x2").iterdir()) == [
        "rank0.2.pt.trace.json.gz",
        "rank0.3.pt.trace.json",
    ]
    assert old.exists() and trace_files(tmp_path) == [old]
    assert len(read_events(tmp_path / "batchgen x2" / "rank0.2.pt.trace.json.gz")) == 4


def test_a_pass_that_ends_before_its_trace_starts_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(steptrace, "TRACE_WAIT", 1.5)
    got = traced_pass(tmp_path, "raw", lambda: None, skip=100)
    assert got == [
        {
            "steps": 0,
            "trace": None,
            "problem": "no trace: the raw pass ended before its step 101, where the trace "
            "would start; lower --trace-after or raise --prompts",
        }
    ]
    assert verdict(got[0]) == got[0]["problem"]


def test_read_events_keeps_complete_events_only(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.pt.trace.json.gz", [*STEPS, {"ph": "i", "name": "x", "ts": 5}])
    assert len(read_events(path)) == 4  # the instant event (no duration) left out
