"""The tuner's search, apart from any engine: coordinate descent over the knobs of a Space, a
line search along each knob's ladder, repeated measurements, a time budget.

Why this and not successive halving over a grid: every trial with other settings needs an engine
of its own (20-120 s to start on a CPU, 40-200 s on a GPU), so what costs is visiting settings,
not measuring them again. Each point is visited once, measured in several passes on its own
engine, and a candidate that is clearly slower after one timed pass gets no more passes (the
halving part). `measure` is injected, so the search runs in tests on made-up timings.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import BatchgenError
from pipeline.tune.space import Space

log = logging.getLogger("batchgen")

# A candidate whose first timed pass is below this share of the incumbent's median throughput
# is clearly slower: it gets no more passes.
EARLY_STOP = 0.8
BUDGET = "the budget ran out"


@dataclass(slots=True)
class Measurement:
    """What one trial measured on its own engine."""

    tok_s: list[float] = field(default_factory=list)  # output tok/s of each timed pass
    output_tokens: int | None = None  # generated in one pass
    start_seconds: float | None = None  # the engine's start, in no tok/s figure
    # The text of every sample row (id, sample index) from the trial's first pass; error rows
    # hold their error. None where texts were not kept.
    texts: dict[tuple[str, int], str | None] | None = None
    unstable_rows: int = 0  # rows whose text differed between this trial's own passes
    tunables: dict[str, Any] | None = None  # the engine's effective settings
    other_cpu: float | None = None  # other processes' share of the machine meanwhile
    cut_short: bool = False  # stopped after one timed pass, below the floor it was given
    error: str | None = None  # the engine refused the settings or died


# measure(settings, floor): settings as vLLM argument names; floor: a first timed pass below
# this many output tok/s may end the measurement (None: always every pass).
Measure = Callable[[dict[str, Any], float | None], Measurement]


@dataclass(slots=True)
class Trial:
    """One point of the search: its settings, what was measured, and the verdict."""

    number: int
    knob: str | None  # the knob this trial moved; None for the baseline
    settings: dict[str, Any]
    measurement: Measurement
    seconds: float  # wall time: engine start, warm-up and timed passes
    verdict: str = ""
    rows_differ: int | None = None  # sample rows whose texts differ from the baseline's
    first_differing: str | None = None  # the id of one of them

    @property
    def median(self) -> float | None:
        return statistics.median(self.measurement.tok_s) if self.measurement.tok_s else None

    @property
    def spread(self) -> float | None:
        """(fastest - slowest pass) / median: the trial's own noise."""
        tok_s = self.measurement.tok_s
        if not tok_s:
            return None
        return (max(tok_s) - min(tok_s)) / statistics.median(tok_s)


@dataclass(slots=True)
class SearchResult:
    """Every trial, the baseline (the job's own settings) and the winner."""

    baseline: Trial
    winner: Trial
    trials: list[Trial]
    space: Space
    not_tried: list[tuple[str, Any, str]]  # (knob, value or None for all of it, why)
    budget_stopped: bool

    @property
    def gain(self) -> float:
        assert self.winner.median is not None and self.baseline.median is not None
        return self.winner.median / self.baseline.median


def search(
    measure: Measure,
    make_space: Callable[[Mapping[str, Any]], Space],
    *,
    budget_seconds: float,
    min_gain: float = 0.03,
    allow_output_changes: bool = False,
    started: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> SearchResult:
    """Measure the baseline, then walk the space's knobs in order, each from the best settings
    so far (the incumbent). A candidate replaces the incumbent only when its slowest timed pass
    beats the incumbent's fastest and its median beats the incumbent's by `min_gain`, and (unless
    `allow_output_changes`) its texts equal the baseline's: so the winner is never slower than
    the baseline as measured. No trial starts that would end past `budget_seconds` after
    `started`, judged by the longest trial so far; the baseline always runs.

    `make_space` gets the baseline engine's effective settings.
    """
    t0 = clock() if started is None else started  # the baseline's time counts
    baseline = _baseline(measure, clock)
    space = make_space(baseline.measurement.tunables or {})
    walk = _Walk(
        measure, space, baseline, budget_seconds, min_gain, allow_output_changes, t0, clock
    )
    for knob in space.knobs:
        walk.knob(knob)
    return SearchResult(
        baseline, walk.incumbent, walk.trials, space, walk.not_tried, walk.budget_stopped
    )


def _baseline(measure: Measure, clock: Callable[[], float]) -> Trial:
    """The first trial: the job's own engine settings; an error if it fails."""
    baseline = _run_trial(0, None, {}, measure, None, clock)
    if baseline.measurement.error or not baseline.measurement.tok_s:
        raise BatchgenError(
            f"the baseline engine (the job's own settings) failed: {baseline.measurement.error}; "
            "the job would fail the same way, so fix that before tuning"
        )
    baseline.verdict = "baseline: the job's engine settings, vLLM's defaults for the rest"
    baseline.rows_differ = 0 if baseline.measurement.texts is not None else None
    log.info("tune: %s", describe_trial(baseline, baseline))
    return baseline


@dataclass(slots=True)
class _Walk:
    """The search's state as it walks the knobs: every trial, the incumbent, what was not tried."""

    measure: Measure
    space: Space
    baseline: Trial
    budget_seconds: float
    min_gain: float
    allow_output_changes: bool
    t0: float
    clock: Callable[[], float]
    trials: list[Trial] = field(default_factory=list)
    incumbent: Trial | None = None
    not_tried: list[tuple[str, Any, str]] = field(default_factory=list)
    budget_stopped: bool = False

    def __post_init__(self) -> None:
        self.trials.append(self.baseline)
        self.incumbent = self.baseline

    def knob(self, knob: Any) -> None:
        """Walk one knob's ladder from the incumbent's value: up, then (a line search that did
        not move) down; a value out of bounds or no better ends that direction."""
        ladder = self.space.ladder(knob, self.incumbent.settings)
        if isinstance(ladder, str) or self.budget_stopped:
            self.not_tried.append((knob.key, None, ladder if isinstance(ladder, str) else BUDGET))
            return
        self.not_tried.extend((knob.key, value, why) for value, why in ladder.skipped)
        for direction in (1, -1) if ladder.line else (1,):
            moved = False
            i = ladder.start + direction
            while 0 <= i < len(ladder.values):
                value = ladder.values[i]
                i += direction
                settings = self.space.candidate(knob, value, self.incumbent.settings)
                problem = self.space.problem(settings)
                if problem:
                    self.not_tried.append((knob.key, value, problem))
                    if ladder.line:
                        break  # further along is further out of bounds
                    continue
                if not self._try(knob.key, value, settings):
                    if self.budget_stopped or ladder.line:
                        break
                    continue
                moved = True
            if moved or self.budget_stopped:
                return

    def _try(self, key: str, value: Any, settings: dict[str, Any]) -> bool:
        """One trial of `settings` unless the budget has run out; whether it became the
        incumbent."""
        longest = max(t.seconds for t in self.trials)
        if self.budget_seconds and self.clock() - self.t0 + longest > self.budget_seconds:
            self.budget_stopped = True
            self.not_tried.append((key, value, BUDGET))
            return False
        incumbent = self.incumbent
        floor = EARLY_STOP * incumbent.median if incumbent.median else None
        trial = _run_trial(len(self.trials), key, settings, self.measure, floor, self.clock)
        self.trials.append(trial)
        kept = _judge(trial, incumbent, self.baseline, self.min_gain, self.allow_output_changes)
        log.info("tune: %s", describe_trial(trial, self.baseline))
        if kept:
            self.incumbent = trial
        return kept


def _run_trial(
    number: int,
    knob: str | None,
    settings: dict[str, Any],
    measure: Measure,
    floor: float | None,
    clock: Callable[[], float],
) -> Trial:
    log.info("tune: trial %d: %s...", number, settings_label(settings) or "the job's settings")
    started = clock()
    measurement = measure(dict(settings), floor)
    return Trial(number, knob, settings, measurement, clock() - started)


def _judge(
    trial: Trial,
    incumbent: Trial,
    baseline: Trial,
    min_gain: float,
    allow_output_changes: bool,
) -> bool:
    """Whether `trial` replaces the incumbent; sets its verdict and text comparison."""
    m = trial.measurement
    if m.error is not None:
        trial.verdict = f"failed: {m.error}"
        return False
    trial.rows_differ, trial.first_differing = rows_differ(baseline.measurement.texts, m.texts)
    assert trial.median is not None and incumbent.median is not None
    if m.cut_short:
        trial.verdict = (
            f"slower: its first pass made {m.tok_s[0]:,.1f} out tok/s, under "
            f"{EARLY_STOP:.0%} of the incumbent's median; no more passes"
        )
        return False
    beats_spread = min(m.tok_s) > max(incumbent.measurement.tok_s)
    if not (beats_spread and trial.median >= incumbent.median * (1 + min_gain)):
        trial.verdict = (
            f"not faster than the incumbent (trial {incumbent.number}) by {min_gain:.0%} and "
            "beyond both trials' spread"
        )
        return False
    if trial.rows_differ and not allow_output_changes:
        trial.verdict = (
            f"faster, but its texts differ from the baseline's in {trial.rows_differ} sample "
            f"row(s) (e.g. {trial.first_differing}): not chosen; --allow-output-changes accepts it"
        )
        return False
    trial.verdict = "faster: kept"
    return True


def rows_differ(
    a: Mapping[tuple[str, int], str | None] | None, b: Mapping[tuple[str, int], str | None] | None
) -> tuple[int | None, str | None]:
    """How many rows (prompt ids) have a sample whose text differs between `a` and `b`, and one
    such id; (None, None) when either has no texts."""
    if a is None or b is None:
        return None, None
    ids = sorted({key[0] for key in a.keys() | b.keys() if a.get(key) != b.get(key)})
    return len(ids), (ids[0] if ids else None)


def settings_text(settings: Mapping[str, Any]) -> str:
    """`key=value` pairs as --engine-arg would take them."""
    return ", ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in settings.items())


def settings_label(settings: Mapping[str, Any]) -> str:
    """The settings, short: ngram speculation as `ngram k=4 (lookup 2-4)`."""
    parts = []
    for key, value in settings.items():
        if key == "speculative_config" and isinstance(value, dict) and value.get("method"):
            parts.append(
                f"{value['method']} k={value.get('num_speculative_tokens')} (lookup "
                f"{value.get('prompt_lookup_min')}-{value.get('prompt_lookup_max')})"
            )
        else:
            parts.append(settings_text({key: value}))
    return ", ".join(parts)


def describe_trial(trial: Trial, baseline: Trial) -> str:
    """One log line for a finished trial."""
    what = settings_label(trial.settings) or "baseline"
    if trial.median is None:
        return f"trial {trial.number} ({what}): {trial.verdict}"
    assert baseline.median is not None
    start = trial.measurement.start_seconds
    return (
        f"trial {trial.number} ({what}): {trial.median:,.1f} out tok/s, median of "
        f"{len(trial.measurement.tok_s)} pass(es), spread {trial.spread:.1%}, "
        f"{trial.median / baseline.median:.3f}x the baseline; engine start "
        f"{'?' if start is None else f'{start:.1f}'} s; {trial.verdict}"
    )
