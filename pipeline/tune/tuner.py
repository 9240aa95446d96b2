"""`batchgen tune` on real engines: the job's sample rows, built once through the run's own
prompt path (read_job, the feeder), timed through `Engine.generate` on an engine made with each
trial's settings; the search itself is pipeline/tune/search.py."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.bench.machine import OtherCpuMeter
from pipeline.config import RunConfig
from pipeline.config.tune import TuneConfig
from pipeline.engines import Engine, FaultPolicy, StopFlags
from pipeline.errors import BatchgenError
from pipeline.positions import Positions
from pipeline.records import PromptRow
from pipeline.runner import Job, read_job, start_engine
from pipeline.stages import READ_BATCH_ROWS, Feeder
from pipeline.tune.search import Measurement, SearchResult, rows_differ, search
from pipeline.tune.space import Space, apply_settings

log = logging.getLogger("batchgen")


@dataclass(slots=True)
class Tuned:
    """A finished tune: the search and what it ran on."""

    result: SearchResult
    sample: list[PromptRow]
    refused: int  # input rows the prompt builder refused on the way (error rows, not timed)
    described: dict[str, Any]  # the baseline engine's describe()
    seconds: float


def run_tune(cfg: TuneConfig) -> Tuned:
    """Read the job, then search its engine settings on a sample of its rows."""
    started = time.monotonic()
    job = read_job(cfg.run)
    trials = TrialRunner(cfg, job)
    result = search(
        trials.measure,
        lambda effective: Space(effective, len(trials.rows or ()), cfg.tries),
        budget_seconds=cfg.budget_seconds,
        min_gain=cfg.min_gain,
        allow_output_changes=cfg.allow_output_changes,
        started=started,
    )
    assert trials.rows is not None and trials.described is not None
    return Tuned(result, trials.rows, trials.refused, trials.described, time.monotonic() - started)


class TrialRunner:
    """Measures one trial: starts the engine for its settings (any other vLLM engine is closed
    first: one fits at a time), then one untimed warm-up pass and `repeats` timed passes over
    the sample rows. The rows are read once, when the first (baseline) engine is up."""

    def __init__(self, cfg: TuneConfig, job: Job) -> None:
        self.cfg, self.job = cfg, job
        self.rows: list[PromptRow] | None = None
        self.count = 0  # the sample size asked for (the input may hold fewer rows)
        self.refused = 0
        self.described: dict[str, Any] | None = None

    def measure(self, settings: dict[str, Any], floor: float | None) -> Measurement:
        baseline = self.rows is None
        started = time.monotonic()
        if settings.get("replicas_per_gpu", 1) > 1:
            return self._replicas(settings, started)
        try:
            engine = start_engine(apply_settings(self.cfg.run.engine, settings), self.job)
            start_seconds = time.monotonic() - started
            if baseline:
                self.described = engine.describe()
                self.count = self.cfg.sample or sample_size(engine.tunables())
                self.rows, self.refused = read_sample(self.cfg.run, self.job, self.count)
            return self._passes(engine, start_seconds, floor)
        except Exception as exc:  # vLLM refuses a setting in many ways; a candidate's failure
            if baseline:  # is a result, the baseline's ends the tune
                raise
            return Measurement(
                start_seconds=time.monotonic() - started, error=f"{type(exc).__name__}: {exc}"
            )

    def _passes(self, engine: Engine, start_seconds: float, floor: float | None) -> Measurement:
        _, _, first = self._pass(engine)  # warm-up: first batch shapes, first touch of the cache
        meter = OtherCpuMeter()
        tok_s: list[float] = []
        texts, tokens, cut_short = first, 0, False
        for i in range(self.cfg.repeats):
            seconds, tokens, texts = self._pass(engine)
            tok_s.append(tokens / seconds)
            if i == 0 and self.cfg.repeats > 1 and floor is not None and tok_s[0] < floor:
                cut_short = True
                break
        return Measurement(
            tok_s=tok_s,
            output_tokens=tokens,
            start_seconds=start_seconds,
            texts=first,
            unstable_rows=rows_differ(first, texts)[0] or 0,
            tunables=engine.tunables(),
            other_cpu=meter.share(),
            cut_short=cut_short,
        )

    def _replicas(self, settings: dict[str, Any], started: float) -> Measurement:
        """A trial of several engines sharing the GPU, each in a worker process of its own
        (pipeline/bench/warm.py); every pass timed from the first replica's start to the last
        one's end. Each replica gets as many rows as the one-engine trials (the input's first
        n x sample rows, dealt out), so each engine is as full as theirs and as a long run's:
        one sample dealt n ways would leave every engine short of `max_num_seqs` and time
        mostly the drain. The texts compared with the baseline's are those of its rows."""
        from pipeline.bench.warm import Side, WarmSides, place_sides
        from pipeline.engines import close_engines

        assert self.rows is not None and self.described is not None
        close_engines()  # the in-process trial engine: the replicas need the memory
        n = settings["replicas_per_gpu"]
        engine = apply_settings(self.cfg.run.engine, settings)
        sides, _ = place_sides([Side("trial", "trial", engine, n, sample=n * self.count)],
                               self.described["model"])  # fmt: skip
        ids = {r.id for r in self.rows}
        try:
            with (
                tempfile.TemporaryDirectory(prefix="batchgen-tune-") as tmp,
                # (the baseline trial, always first, compiled the model on this host)
                WarmSides(sides, self.cfg.run, Path(tmp), parallel=True, first_alone=False) as warm,
            ):
                warm.start()
                start_seconds = time.monotonic() - started
                first = _only(warm.run_pass("trial", "warm-up").texts, ids)
                passes = [warm.run_pass("trial", f"pass-{i}") for i in range(self.cfg.repeats)]
        except Exception as exc:
            return Measurement(
                start_seconds=time.monotonic() - started, error=f"{type(exc).__name__}: {exc}"
            )
        return Measurement(
            tok_s=[p.output_tok_s for p in passes],
            output_tokens=passes[-1].output_tokens,
            start_seconds=start_seconds,
            texts=first,
            unstable_rows=rows_differ(first, _only(passes[-1].texts, ids))[0] or 0,
            tunables={"replicas_per_gpu": n},
        )

    def _pass(self, engine: Engine) -> tuple[float, int, dict[tuple[str, int], str | None]]:
        """One pass over the sample: seconds, output tokens, and every row's text."""
        assert self.rows is not None
        run = self.cfg.run
        engine.reset_prefix_cache()  # the job never sends a prompt twice
        faults = FaultPolicy(restarts=0, stall_seconds=run.stall_seconds)
        texts: dict[tuple[str, int], str | None] = {}
        tokens = 0
        started = time.monotonic()
        for results in engine.generate(iter(self.rows), StopFlags(), run.max_inflight, faults):
            for r in results:
                if r.error is None:
                    tokens += r.completion_tokens or 0
                    texts[(r.id, r.sample_index)] = r.text
                else:
                    texts[(r.id, r.sample_index)] = f"error: {r.error}"
        return time.monotonic() - started, tokens, texts


def _only(
    texts: dict[tuple[str, int], str | None] | None, ids: set[str]
) -> dict[tuple[str, int], str | None] | None:
    """The texts (every sample's) of the rows with these ids."""
    return None if texts is None else {k: v for k, v in texts.items() if k[0] in ids}


SAMPLE_SEQS = 4
MIN_SAMPLE = 256


def sample_size(tunables: dict[str, Any]) -> int:
    """The default sample: SAMPLE_SEQS x the engine's max_num_seqs, at least MIN_SAMPLE."""
    seqs = tunables.get("max_num_seqs") or 0
    return max(SAMPLE_SEQS * int(seqs), MIN_SAMPLE)


def read_sample(cfg: RunConfig, job: Job, count: int) -> tuple[list[PromptRow], int]:
    """The first `count` rows of the input that the job would send, built by the run's own
    feeder (ids, chat template, tokens, per-row sampling and adapters), and how many rows it
    refused on the way (error rows: they cost no engine time)."""
    flags = StopFlags()
    feeder = Feeder(
        job.source,
        job.builder,
        Positions(),  # nothing committed: a trial reads from the input's start
        cfg.source.id_column,
        flags,
        batch_rows=min(count, READ_BATCH_ROWS),
        depth=2,
    )
    rows: list[PromptRow] = []
    refused = 0
    try:
        feeder.start()
        for row in feeder.feed():
            if row is None:
                continue
            if row.error is not None:
                refused += 1
                continue
            rows.append(row)
            if len(rows) == count:
                break
    finally:
        flags.stop.set()
        feeder.wait_ended()
    if feeder.error is not None:
        if isinstance(feeder.error, BatchgenError):
            raise feeder.error
        raise BatchgenError(f"reading the input failed: {feeder.error}") from feeder.error
    if not rows:
        raise BatchgenError(
            f"none of the first {refused:,} input rows can be sent (all are error rows, e.g. "
            "empty or longer than the context): nothing to tune on; `batchgen run` writes why "
            "in each row's `error` column"
        )
    return rows, refused
