"""`batchgen tune --verify N`: after the search, the whole job with the baseline's settings and
with the winner's, alternating over N rounds on warm engines (pipeline/bench/warm.py), and how
far each trial's figure was from its whole run's. A trial times `Engine.generate` over a sample;
a run adds reading, templating and writing the whole input: the check that trials predict runs.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.bench.stats import spread, spread_text
from pipeline.config import EngineConfig
from pipeline.tune.space import RUN_DEFAULTS, apply_settings
from pipeline.tune.tuner import TuneConfig, Tuned

if TYPE_CHECKING:
    from pipeline.bench.warm import Side

log = logging.getLogger("batchgen")

PREDICTS_WITHIN = 0.10  # a trial within 10% of its whole run's figure predicts it


class Verify:
    """--verify's rounds, kept as they end: `run` runs them all; when it is stopped (a stop
    signal raises in the middle of a pass), `report` still tells the rounds that ended."""

    def __init__(self, cfg: TuneConfig, tuned: Tuned) -> None:
        self.cfg, self.tuned = cfg, tuned
        self.rounds: list[dict[str, Any]] = []
        self.cold: dict[str, float] = {}
        self.share: dict[str, Any] = {}

    def run(self) -> dict[str, Any]:
        """Run the whole job as baseline and winner, alternating; the report's `verify` part."""
        from pipeline.bench.warm import WarmSides, alternate, place_sides
        from pipeline.engines import close_engines

        close_engines()  # the last trial's engine: the workers need the memory
        model = self.tuned.described["model"]
        winner = self.tuned.result.winner
        sides, self.share = place_sides(verify_sides(self.cfg.run.engine, winner.settings), model)
        names = [s.name for s in sides]
        run_cfg = dataclasses.replace(self.cfg.run, progress_seconds=3600.0)
        started = time.monotonic()
        parallel = self.share.get("engines_on_the_gpu") is not None
        with (
            tempfile.TemporaryDirectory(prefix="batchgen-verify-") as tmp,
            # (both sides' settings started in the search's trials: no first start to wait for)
            WarmSides(sides, run_cfg, Path(tmp), parallel=parallel, first_alone=False) as warm,
        ):
            warm.start()
            log.info("tune --verify: cold pass of each side (untimed)")
            self.cold = {n: warm.run_pass(n, "cold").seconds for n in names}
            alternate(warm, names, self.cfg.verify_rounds, 0, started, done=self.rounds)
        report = self.report()
        assert report is not None
        return report

    def report(self) -> dict[str, Any] | None:
        """The rounds that ended, as the report's `verify` part; None before the first."""
        if not self.rounds:
            return None
        return verify_report(self.tuned, self.rounds, self.cold, self.share)


def verify_sides(engine: EngineConfig, winner: Mapping[str, Any]) -> list[Side]:
    """The two sides of --verify: the job's engine, and the winner's settings on it, with as
    many engines per GPU as the winner has replicas (a run flag, not an engine setting)."""
    from pipeline.bench.warm import Side

    return [
        Side("baseline", "batchgen", engine),
        Side(
            "winner",
            "batchgen",
            apply_settings(engine, winner),
            replicas=int(winner.get("replicas_per_gpu", RUN_DEFAULTS["replicas_per_gpu"])),
        ),
    ]


def verify_report(
    tuned: Tuned, rounds: list[dict[str, Any]], cold: dict[str, float], share: dict[str, Any]
) -> dict[str, Any]:
    """Each side's whole-run output tok/s, the winner's ratio, and each trial's error."""
    trials = {"baseline": tuned.result.baseline.median, "winner": tuned.result.winner.median}
    sides: dict[str, Any] = {}
    for name in ("baseline", "winner"):
        tok_s = [r[name].output_tok_s for r in rounds]
        run = statistics.median(tok_s)
        trial = trials[name]
        error = None if trial is None else trial / run - 1
        sides[name] = {
            "run_output_tok_s": spread(tok_s, 1),
            "trial_output_tok_s": None if trial is None else round(trial, 1),
            "trial_error": None if error is None else round(error, 4),
            "trial_predicts_run": None if error is None else abs(error) <= PREDICTS_WITHIN,
            "cold_pass_s": round(cold[name], 2),
            "rows": rounds[0][name].rows,
            "output_tokens_median": statistics.median(r[name].output_tokens for r in rounds),
        }
    ratio = spread([r["winner"].output_tok_s / r["baseline"].output_tok_s for r in rounds])
    same = tuned.result.winner is tuned.result.baseline  # an A/A test: the noise of the rounds
    return {
        "rounds": len(rounds),
        "sides": sides,
        "ratio": ratio,
        "same_settings": same,
        "memory_per_engine": share,
    }


def format_verify(v: dict[str, Any]) -> list[str]:
    """The lines `batchgen tune` prints for --verify."""
    lines = ["", f"verify: the whole job, {v['rounds']} alternating round(s) on warm engines"]
    for name, s in v["sides"].items():
        run = s["run_output_tok_s"]
        trial = s["trial_output_tok_s"]
        predicted = (
            "-"
            if s["trial_error"] is None
            else f"{trial:,.1f} ({s['trial_error']:+.1%}: "
            + ("within" if s["trial_predicts_run"] else "NOT within")
            + f" {PREDICTS_WITHIN:.0%})"
        )
        lines.append(
            f"  {name:9} run {run['median']:,.1f} out tok/s (min-max {run['min']:,.1f}-"
            f"{run['max']:,.1f}); its trial {predicted}"
        )
    lines.append(f"  winner / baseline on the whole job: {spread_text(v['ratio'])}")
    if v.get("same_settings"):
        lines.append(
            "  (the winner is the baseline: both sides ran the same settings, so this spread is "
            "the noise of the measurement here)"
        )
    return lines
