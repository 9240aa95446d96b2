"""`batchgen plan --calibrate`: the real engine on a uniform sample of the prompts to do, on
this machine, for a while; the rate it measured, its spread, and the outputs' stop behaviour."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import BatchgenError
from pipeline.humanize import fmt_duration
from pipeline.records import PromptRow, ResultRow

log = logging.getLogger("batchgen")

CALIBRATION_SAMPLE = 4096  # requests kept for --calibrate, drawn evenly from the whole input
CALIBRATION_WINDOWS = 5  # the measured span is cut into this many windows for the spread


@dataclass(slots=True)
class Calibration:
    """The real engine on a sample of the prompts to do, on this machine, for a while.

    The rate is completed prompts over the time to the last completion: work still running at
    the stop is not counted, and its time is not either. An engine that runs its whole batch in
    step finishes prompts in waves; a span that ends on a completion holds whole waves, so the
    rate is a job's rate. The spread comes from windows cut at completions, each ending on one.
    """

    seconds: float  # from the first admission to the last completion
    budget: float  # --calibrate SECONDS
    sample: int  # requests in the sample
    prompts: int  # sample prompts completed
    samples: int  # their output rows
    output_tokens: int
    first_seconds: float  # until the first completion
    events: int  # engine steps that finished prompts
    windows: list[tuple[float, int]]  # (seconds, prompts completed) of each window
    whole: bool  # the sample was every prompt to do, and all of it finished
    engine_start_seconds: float
    engine_max_model_len: int
    # Stop behaviour from the longest run of admitted prompts that all finished: outputs still
    # running at the stop are the long ones, so the completed set alone would favour short ones.
    stop_samples: int
    stop_tokens: int
    finish_reasons: dict[str, int]

    @property
    def rate(self) -> float:
        """Prompts per second."""
        return self.prompts / self.seconds

    def window_rates(self) -> list[float]:
        return [n / s for s, n in self.windows if s > 0]

    def eta(self, prompts: int) -> tuple[float, float, float]:
        """(estimate, low, high) seconds for `prompts` engine prompts on this machine; low and
        high at the fastest and slowest window's rate."""
        if self.whole and prompts == self.sample:
            return self.seconds, self.seconds, self.seconds
        rates = self.window_rates() or [self.rate]
        return prompts / self.rate, prompts / max(rates), prompts / min(rates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 2),
            "budget_seconds": self.budget,
            "sample_prompts": self.sample,
            "completed_prompts": self.prompts,
            "completed_rows": self.samples,
            "output_tokens": self.output_tokens,
            "first_result_seconds": round(self.first_seconds, 2),
            "completion_steps": self.events,
            "prompts_per_second": round(self.rate, 3),
            "output_tokens_per_second": round(self.output_tokens / self.seconds, 1),
            "windows": [
                {"seconds": round(s, 2), "prompts": n, "prompts_per_second": round(n / s, 3)}
                for s, n in self.windows
                if s > 0
            ],
            "whole_job": self.whole,
            "engine_start_seconds": round(self.engine_start_seconds, 2),
            "engine_max_model_len": self.engine_max_model_len,
            "finish_reasons": self.finish_reasons,
        }


class Reservoir:
    """A uniform sample of up to `size` engine requests over the whole input (Algorithm R)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.rows: list[PromptRow] = []
        self.seen = 0
        self._random = random.Random(seed)

    def add(self, rows: list[PromptRow]) -> None:
        for row in rows:
            if row.error is not None:
                continue
            self.seen += 1
            if len(self.rows) < self.size:
                self.rows.append(row)
            else:
                j = self._random.randrange(self.seen)
                if j < self.size:
                    self.rows[j] = row


@contextlib.contextmanager
def calibration_log(divert: bool) -> Iterator[Path | None]:
    """Where vLLM's own output goes while plan starts its engine, as a run's goes to its engine
    log: a temporary file (plan writes nothing in --output), removed after a calibration,
    kept when it fails (a failed start names it). None without `divert` (-v): on the terminal."""
    if not divert:
        yield None
        return
    fd, name = tempfile.mkstemp(prefix="batchgen-plan-engine-", suffix=".log")
    os.close(fd)
    path = Path(name)
    yield path
    # Reached only when calibration succeeded: after a failure the log stays for its reader.
    path.unlink(missing_ok=True)


def calibrate_engine(
    cfg: RunConfig, model: str, sample: list[PromptRow], seconds: float, whole: bool
) -> Calibration:
    """Run `sample` through the real engine for `seconds`, and for at least twice the time its
    first prompt took to finish (so the span holds more than the first requests' lifetime), and
    measure the rate."""
    from pipeline.engines import in_process_engine

    with calibration_log(cfg.engine_log) as log_path:
        engine = in_process_engine(cfg.engine, model, log_path)
        return _calibrate(cfg, engine, sample, seconds, whole)


def _calibrate(
    cfg: RunConfig, engine: Any, sample: list[PromptRow], seconds: float, whole: bool
) -> Calibration:
    """Calibration on a started engine (see calibrate_engine)."""
    from pipeline.engines import StopFlags

    # The ids of a sample may repeat across ranks; results are matched by position instead.
    order = list(sample)
    random.Random(0).shuffle(order)
    rows = [dataclasses.replace(row, id=str(i)) for i, row in enumerate(order)]
    flags = StopFlags()
    events: list[tuple[float, list[ResultRow]]] = []
    first: list[float] = []  # when the first prompt finished
    started = time.monotonic()

    def watch() -> None:
        while not flags.stop.is_set():
            elapsed = time.monotonic() - started
            if elapsed >= seconds and first and elapsed >= 2 * first[0]:
                flags.stop.set()
                flags.abort.set()
            time.sleep(0.05)

    log.info(
        "calibrating: %s sampled prompts through the engine for %s...",
        f"{len(rows):,}",
        fmt_duration(seconds, tenths=True),
    )
    watcher = threading.Thread(target=watch, name="batchgen-calibrate", daemon=True)
    watcher.start()
    try:
        for results in engine.generate(iter(rows), flags, cfg.max_inflight):
            at = time.monotonic() - started
            events.append((at, results))
            if not first and any(r.error is None for r in results):
                first.append(at)
    except Exception as exc:
        raise BatchgenError(f"--calibrate: the engine failed: {type(exc).__name__}: {exc}") from exc
    finally:
        flags.stop.set()
        watcher.join()
    log.info("calibration done; its unfinished requests were dropped (nothing was written)")
    # Calibration's prompts must not make a later run in this process look faster.
    reset = getattr(engine, "reset_prefix_cache", None)
    if reset is not None:
        reset()
    return _measure(events, seconds, len(rows), whole, engine)


def _measure(
    events: list[tuple[float, list[ResultRow]]],
    budget: float,
    sample: int,
    whole: bool,
    engine: Any,
) -> Calibration:
    steps: list[tuple[float, int]] = []  # (time, prompts completed) per engine step
    finished: dict[int, tuple[int, int, Counter[str]]] = {}  # prompt -> (samples, tokens, reasons)
    output_tokens = samples = 0
    for at, results in events:
        done = 0
        for r in results:
            if r.error is not None:  # refused by the engine: no time spent
                continue
            samples += 1
            output_tokens += r.completion_tokens or 0
            count, tokens, reasons = finished.get(int(r.id), (0, 0, Counter()))
            reasons[r.finish_reason or "unknown"] += 1
            finished[int(r.id)] = (count + 1, tokens + (r.completion_tokens or 0), reasons)
            done += r.sample_index == 0
        if done:
            steps.append((at, done))
    if not steps:
        raise BatchgenError("--calibrate: no sampled prompt reached the engine")
    # Up to CALIBRATION_WINDOWS windows, each ending on a completion, of equally many steps.
    count = min(CALIBRATION_WINDOWS, len(steps))
    ends = [round((k + 1) * len(steps) / count) - 1 for k in range(count)]
    windows, begin, start = [], 0.0, 0
    for end in ends:
        windows.append((steps[end][0] - begin, sum(n for _, n in steps[start : end + 1])))
        begin, start = steps[end][0], end + 1
    # The longest prefix of the admission order that all finished: an unbiased sample of outputs.
    stop_samples = stop_tokens = 0
    reasons: Counter[str] = Counter()
    for i in range(sample):
        if i not in finished:
            break
        stop_samples += finished[i][0]
        stop_tokens += finished[i][1]
        reasons.update(finished[i][2])
    prompts = sum(n for _, n in steps)
    return Calibration(
        seconds=steps[-1][0],
        budget=budget,
        sample=sample,
        prompts=prompts,
        samples=samples,
        output_tokens=output_tokens,
        first_seconds=steps[0][0],
        events=len(steps),
        windows=windows,
        whole=whole and prompts == sample,
        engine_start_seconds=engine.start_seconds,
        engine_max_model_len=engine.max_model_len,
        stop_samples=stop_samples,
        stop_tokens=stop_tokens,
        finish_reasons=dict(sorted(reasons.items())),
    )
