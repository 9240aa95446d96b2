"""The warm bench protocol (`batchgen bench --raw-defaults / --replicas-per-gpu`,
pipeline/bench/compare.py `run_warm`) on a fake set of warm sides: which side runs when, the
cold pass kept out of the figures and reported apart, the per-round ratios' median and spread,
and the report's fields. No engine, no worker process: `WarmSides` is replaced by a table of
pass times."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.bench import BenchConfig, compare
from pipeline.bench.machine import to_json
from pipeline.bench.stats import bootstrap_median
from pipeline.bench.warm import Pass

OUTPUT_TOKENS = 1000
PROMPT_TOKENS = 400
# Seconds of each side's pass: the cold one, then round 0, 1, 2. Every pass makes the same
# tokens, so a side's tok/s ratio to raw in a round is raw's seconds / the side's.
SECONDS = {
    "raw": {"cold": 100.0, "round-0": 1.0, "round-1": 2.0, "round-2": 1.0},
    "batchgen": {"cold": 100.0, "round-0": 1.0, "round-1": 1.0, "round-2": 0.5},
    "batchgen x2": {"cold": 1.0, "round-0": 2.0, "round-1": 1.0, "round-2": 4.0},
}


# A trace of 4 step markers 10 ms apart, each 2 ms in execute, with no device activity.
TRACE = [
    {"ph": "X", "cat": "user_annotation", "name": "execute_context_0(0)_generation_8(8)",
     "pid": 1, "tid": 1, "ts": 10_000 * i, "dur": 2000}
    for i in range(4)
]  # fmt: skip


class FakeWarmSides:
    """`WarmSides` without processes: records every call; each pass takes SECONDS' time."""

    calls: list[tuple[str, ...]] = []

    def __init__(self, sides: list[Any], run_cfg: Any, work: Path, parallel: bool) -> None:
        self.sides = {s.name: s for s in sides}
        self.starts = {s.name: [1.5] * s.replicas for s in sides}
        self.calls.append(("init", *self.sides, f"parallel={parallel}"))

    def __enter__(self) -> FakeWarmSides:
        return self

    def __exit__(self, *exc: object) -> None:
        self.calls.append(("close",))

    def start(self) -> None:
        self.calls.append(("start",))

    def run_pass(self, name: str, tag: str, trace: bool = False) -> Pass:
        self.calls.append((name, tag, "traced") if trace else (name, tag))
        if trace:  # each engine's profiler writes a trace of 3 steps where it was told to
            profiler = dict(self.sides[name].engine.engine_args)["profiler_config"]
            for replica in range(self.sides[name].replicas):
                path = Path(profiler["torch_profiler_dir"]) / f"{name}-{replica}.pt.trace.json"
                path.write_text(json.dumps({"traceEvents": TRACE}))
            return Pass(name, 9.0, 8, PROMPT_TOKENS, OUTPUT_TOKENS)
        seconds = SECONDS[name][tag]
        return Pass(name, seconds, 8, PROMPT_TOKENS, OUTPUT_TOKENS, None, 0.5, 0.25)

    def tunables(self, name: str) -> dict[str, Any]:
        return {"max_num_seqs": 4 * self.sides[name].replicas}

    def kv_cache_tokens(self, name: str) -> int | None:
        return 1000 * self.sides[name].replicas


@pytest.fixture
def warm(monkeypatch: pytest.MonkeyPatch) -> type[FakeWarmSides]:
    FakeWarmSides.calls = []
    monkeypatch.setattr(compare, "WarmSides", FakeWarmSides)
    machine = {"cpu": "test cpu", "cpus_usable": 2, "gpu": None, "vllm": "0", "torch": "0"}
    monkeypatch.setattr(compare, "machine_info", lambda: machine)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "8")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return FakeWarmSides


def _bench(tmp_path: Path, **settings: Any) -> dict[str, Any]:
    cfg = BenchConfig(prompts=8, replicas=(1, 2), work_dir=str(tmp_path), **settings)
    return compare.run_warm(cfg)


def test_sides_alternate_each_round_after_one_untimed_cold_pass(
    tmp_path: Path, warm: type[FakeWarmSides]
) -> None:
    report = _bench(tmp_path, rounds=3, budget_seconds=0)
    assert warm.calls == [
        ("init", "raw", "batchgen", "batchgen x2", "parallel=False"),
        ("start",),
        ("raw", "cold"),
        ("batchgen", "cold"),
        ("batchgen x2", "cold"),
        ("raw", "round-0"),
        ("batchgen", "round-0"),
        ("batchgen x2", "round-0"),
        ("batchgen", "round-1"),
        ("batchgen x2", "round-1"),
        ("raw", "round-1"),
        ("batchgen x2", "round-2"),
        ("raw", "round-2"),
        ("batchgen", "round-2"),
        ("close",),
    ]
    assert [r["order"] for r in report["rounds"]] == [
        ["raw", "batchgen", "batchgen x2"],
        ["batchgen", "batchgen x2", "raw"],
        ["batchgen x2", "raw", "batchgen"],
    ]


def test_ratios_are_per_round_medians_with_their_spread_and_the_cold_pass_apart(
    tmp_path: Path, warm: type[FakeWarmSides]
) -> None:
    report = _bench(tmp_path, rounds=3, budget_seconds=0)
    # batchgen: 1/1, 2/1, 1/0.5 -> median 2; batchgen x2: 1/2, 2/1, 1/4 -> median 0.5. With the
    # cold pass counted as a round, the medians would be 1.0 and 0.75 (100/100, 100/1 added).
    batchgen, doubled = report["ratios"]["batchgen"], report["ratios"]["batchgen x2"]
    assert (batchgen["median"], batchgen["min"], batchgen["max"]) == (2.0, 1.0, 2.0)
    assert batchgen["values"] == [1.0, 2.0, 2.0] and batchgen["rounds"] == 3
    assert batchgen["bootstrap_90"] == list(bootstrap_median([1.0, 2.0, 2.0]))
    assert (doubled["median"], doubled["min"], doubled["max"]) == (0.5, 0.25, 2.0)
    assert doubled["values"] == [0.5, 2.0, 0.25]
    assert report["ratio"] == 2.0  # the first batchgen side's
    raw = report["sides"]["raw"]
    assert raw["output_tok_s"]["values"] == [1000.0, 500.0, 1000.0]
    assert raw["seconds_median"] == 1.0 and raw["output_tokens_median"] == OUTPUT_TOKENS
    assert raw["cold_pass"]["seconds"] == 100.0 and raw["cold_pass"]["output_tok_s"] == 10.0
    assert report["sides"]["batchgen x2"]["cold_pass"]["seconds"] == 1.0
    assert report["rounds"][1]["raw"]["seconds"] == 2.0


def test_report_fields_and_json(tmp_path: Path, warm: type[FakeWarmSides]) -> None:
    report = _bench(tmp_path, rounds=3, budget_seconds=0)
    assert set(report) == {
        "protocol",
        "ratio",
        "ratios",
        "rounds_asked",
        "caution",
        "sides",
        "memory_per_engine",
        "rounds",
        "prompts",
        "prompt_tokens",
        "output_budget_min_mean_max",
        "stop_at_eos",
        "task",
        "temperature",
        "rows_per_shard",
        "model",
        "raw_defaults",
        "machine",
        "engine_starts_s",
        "tunables",
        "kv_cache_tokens",
        "bench_seconds",
    }
    # four engines (raw, batchgen, two replicas) share the CPU engine's 8 GiB of KV cache
    assert report["memory_per_engine"] == {"engines_on_the_cpu": 4, "VLLM_CPU_KVCACHE_SPACE": 2}
    assert report["engine_starts_s"] == {"raw": [1.5], "batchgen": [1.5], "batchgen x2": [1.5] * 2}
    assert report["tunables"]["batchgen x2"] == {"max_num_seqs": 8}
    assert report["kv_cache_tokens"] == {"raw": 1000, "batchgen": 1000, "batchgen x2": 2000}
    doubled = report["sides"]["batchgen x2"]
    assert (doubled["kind"], doubled["replicas"]) == ("batchgen", 2)
    assert (doubled["front_cpu_median"], doubled["core_cpu_median"]) == (0.5, 0.25)
    assert doubled["gpu_busy_median"] is None
    assert report["prompts"] == 8 and report["prompt_tokens"] == PROMPT_TOKENS
    assert (report["raw_defaults"], report["stop_at_eos"], report["rows_per_shard"]) == (
        False,
        False,
        1,
    )
    assert set(report["rounds"][0]) == {"order", "raw", "batchgen", "batchgen x2"}
    assert json.loads(to_json(report))["ratios"]["batchgen"]["median"] == 2.0
    text = compare.format_warm(report)
    assert "batchgen / raw: 2.000 (min-max 1.000-2.000" in text
    assert "batchgen x2 / raw: 0.500 (min-max 0.250-2.000" in text


def test_no_round_starts_past_the_budget(tmp_path: Path, warm: type[FakeWarmSides]) -> None:
    """A round of these sides takes 4 s of (fake) pass time: with a 1 s budget only the first
    round runs, and the figures are that round's."""
    report = _bench(tmp_path, rounds=3, budget_seconds=1)
    assert [r["order"] for r in report["rounds"]] == [["raw", "batchgen", "batchgen x2"]]
    assert report["ratios"]["batchgen"]["values"] == [1.0]
    assert report["ratios"]["batchgen"]["rounds"] == 1
    assert report["rounds_asked"] == 3
    assert report["caution"].startswith("1 round of the 3 asked (the budget ran out): a probe")
    assert f"caution: {report['caution']}" in compare.format_warm(report)


def test_five_rounds_carry_no_caution_fewer_do(
    tmp_path: Path, warm: type[FakeWarmSides], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The docs quote ratios of >= 5 rounds; a report of fewer says so even when they were all
    that was asked."""
    three = _bench(tmp_path / "three", rounds=3, budget_seconds=0)
    assert three["caution"].startswith("3 rounds: a probe, not a figure to quote")
    for name, side in SECONDS.items():
        monkeypatch.setitem(SECONDS, name, {**side, "round-3": 1.0, "round-4": 1.0})
    five = _bench(tmp_path / "five", rounds=5, budget_seconds=0)
    assert five["caution"] is None
    assert "caution" not in compare.format_warm(five)


def test_traced_passes_follow_the_rounds_one_per_side_with_a_trace_per_engine(
    tmp_path: Path, warm: type[FakeWarmSides]
) -> None:
    """--trace-steps 32 --trace-after 8 on warm sides: every engine starts with vLLM's profiler
    configured (idle until a traced pass, 32 steps after the first 8, into the bench's trace
    folder); after the timed rounds each side runs one traced pass, kept out of the figures;
    each engine's trace is filed under its side and summarized, one summary per replica."""
    report = _bench(tmp_path, rounds=2, budget_seconds=0, trace_steps=32, trace_after=8)
    passes = [c for c in FakeWarmSides.calls if len(c) > 1 and c[0] in SECONDS]
    assert passes[-3:] == [(n, "trace", "traced") for n in ("raw", "batchgen", "batchgen x2")]
    assert all(len(c) == 2 for c in passes[:-3])  # the cold pass and the rounds: untraced
    assert len(report["rounds"]) == 2  # the traced passes are no round
    for side in report["sides"].values():
        profiler = side["engine_args"]["profiler_config"]
        assert profiler["torch_profiler_dir"] == str((tmp_path / "trace").resolve())
        assert (profiler["delay_iterations"], profiler["max_iterations"]) == (8, 32)
    trace = report["step_trace"]
    assert (trace["traced_steps"], trace["skipped_steps"]) == (32, 8)
    assert [s["trace"] for s in trace["raw"]] == ["raw/raw-0.pt.trace.json"]
    assert sorted(s["trace"] for s in trace["batchgen x2"]) == [
        "batchgen x2/batchgen x2-0.pt.trace.json",
        "batchgen x2/batchgen x2-1.pt.trace.json",
    ]
    for summaries in (trace["raw"], trace["batchgen"], trace["batchgen x2"]):
        for s in summaries:
            assert (s["steps"], s["step_ms"]["median"], s["execute_share"]) == (3, 10.0, 0.2)
            assert s["requests_per_step"]["median"] == 8.0
    text = compare.format_warm(report)
    assert "engine steps, traced after the timed rounds (32 steps after the first 8" in text
    assert "  batchgen x2 engine 2: 3 steps, median 10.00 ms, worker in execute 20%" in text
    assert "  raw: 3 steps" in text
