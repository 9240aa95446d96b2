"""`batchgen plan`: what a run would do, before it does it.

It reads the input (one rank's slice, or every rank's) and renders and tokenizes every prompt
through the run's own code (pipeline/job.py, then stages.request_batches), without an engine,
and counts: prompts, what --output already holds, error rows by kind, prompt tokens and their
percentiles, and the output-token ceiling. Memory stays flat in the input's size: counters, an
exact histogram of prompt lengths (at most one entry per length up to the context), a few
example ids and, for --calibrate, a fixed-size sample of requests. (As in a run, the ids
committed in --output, and with --id-column the ids read so far, are held too.)

Expected output tokens and an ETA are given only from a measurement: --calibrate SECONDS (the
real engine on a sample of these prompts, on this machine), else the last run recorded in
--output; otherwise none is given.

The counts are pipeline/tally.py's; the measurement pipeline/calibrate.py's.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from pipeline.calibrate import CALIBRATION_SAMPLE, Calibration, Reservoir, calibrate_engine
from pipeline.checkpoint import Manifest, lock_holder, preview_resume
from pipeline.config import RunConfig
from pipeline.errors import BatchgenError, ConfigError
from pipeline.fingerprint import for_rank
from pipeline.humanize import fmt_duration, plural
from pipeline.positions import Positions
from pipeline.tally import PERCENTILES, ErrorKind, History, RankPlan, Tally

log = logging.getLogger("batchgen")


@dataclass(slots=True)
class Plan:
    """Every planned rank, their sum, and what follows: estimates and whether the job can run."""

    cfg: RunConfig
    model: str
    sampling: dict[str, Any]  # resolved, as the run would send it
    max_model_len: int
    max_model_len_from: str
    ranks: list[RankPlan]
    total: Tally
    history: History | None = None
    calibration: Calibration | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def all_ranks(self) -> bool:
        return len(self.ranks) == self.cfg.num_ranks and self.cfg.num_ranks > 1

    def committed(self, name: str) -> int:
        return sum(getattr(r, name) for r in self.ranks)

    def reasons(self) -> list[str]:
        """Why the job cannot run as given; empty when it can."""
        reasons = []
        for r in self.ranks:
            if r.holder is not None:
                reasons.append(
                    f"rank {r.rank} of {self.cfg.output_dir} is being written now by {r.holder}; "
                    "a second run of it would be refused: wait for it, or plan another --output"
                )
        refused = [line for r in self.ranks for line in r.refused]
        if refused:
            reasons.append(
                "a run would be refused: --output holds a run with different settings ("
                + "; ".join(dict.fromkeys(refused))
                + "); rerun with its settings, pass --overwrite to start afresh, or choose "
                "another --output"
            )
        t = self.total
        where = self._where()
        if t.prompts == 0 and self.committed("committed_prompts") == 0:
            reasons.append(f"the input has no rows{where}: there is nothing to generate")
        elif t.prompts and t.engine_prompts == 0:
            kinds = ", ".join(f"{k} {e.prompts:,}" for k, e in _by_count(t.errors))
            reasons.append(
                f"every one of the {t.prompts:,} prompts to do{where} is an error row ({kinds}); "
                "fix the input or the prompt flags"
            )
        else:
            errors = self.committed("committed_errors") + t.error_rows
            rows = self.committed("committed_rows") + t.rows
            if rows and errors / rows > self.cfg.max_error_rate:
                reasons.append(
                    f"{errors:,} of {rows:,} rows{where} ({errors / rows:.1%}) would be error "
                    f"rows, above --max-error-rate {self.cfg.max_error_rate:g}, so the run would "
                    "end with exit 1; fix the input or flags, or raise --max-error-rate"
                )
        return reasons

    def _where(self) -> str:
        if self.cfg.num_ranks == 1 or self.all_ranks:
            return ""
        return f" of rank {self.ranks[0].rank}"

    @property
    def exit_code(self) -> int:
        return 1 if self.reasons() else 0

    def expected_output(self) -> tuple[int, str, float] | None:
        """(tokens, where the stop behaviour comes from, tokens per sample), when known."""
        t = self.total
        c = self.calibration
        if c is not None and c.stop_samples:
            per = c.stop_tokens / c.stop_samples
            source = f"--calibrate: {c.stop_samples:,} sampled outputs"
        elif self.history is not None and self.history.samples:
            per = self.history.completion_tokens / self.history.samples
            source = f"{self.history.samples:,} outputs committed in {self.cfg.output_dir}"
        else:
            return None
        return min(round(per * t.samples), t.ceiling), source, per

    def eta(self) -> dict[str, Any] | None:
        """Seconds for all planned ranks on this machine and per rank, each rank's engine start
        included (measured as the rate was: by --calibrate, or in the last run); None without
        a measured rate."""
        c, h = self.calibration, self.history
        if c is not None:
            whole, low, high = c.eta(self.total.engine_prompts)
            per_rank = [c.eta(r.tally.engine_prompts)[0] for r in self.ranks]
            source, start = "calibration", c.engine_start_seconds
        elif h is not None and h.rate is not None:
            whole = self.total.engine_prompts / h.rate
            low = high = None
            per_rank = [r.tally.engine_prompts / h.rate for r in self.ranks]
            source, start = "last run", h.last_start_seconds
        else:
            return None
        starts = start * len(self.ranks)  # each rank starts its own engine
        return {
            "from": source,
            "seconds": round(whole + starts, 1),
            "generate_seconds": round(whole, 1),
            "engine_start_seconds": round(start, 1),
            "low": None if low is None else round(low + starts, 1),
            "high": None if high is None else round(high + starts, 1),
            "per_rank": {
                str(r.rank): round(s + start, 1) for r, s in zip(self.ranks, per_rank, strict=True)
            },
        }

    def to_dict(self) -> dict[str, Any]:
        cfg = self.cfg
        expected = self.expected_output()
        reasons = self.reasons()
        return {
            "input": cfg.source.label,
            "output": cfg.output.path or None,
            "model": self.model,
            "max_model_len": self.max_model_len,
            "max_model_len_from": self.max_model_len_from,
            "num_shards": cfg.num_ranks,
            "ranks": [r.to_dict() for r in self.ranks],
            "all": {
                "input_prompts": _sum_known([r.input_prompts for r in self.ranks]),
                "committed_prompts": self.committed("committed_prompts"),
                "committed_rows": self.committed("committed_rows"),
                "committed_error_rows": self.committed("committed_errors"),
                "todo": self.total.to_dict(),
            },
            "expected_output_tokens": None
            if expected is None
            else {"tokens": expected[0], "from": expected[1], "per_sample": round(expected[2], 2)},
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "last_run_prompts_per_second": None
            if self.history is None or self.history.rate is None
            else round(self.history.rate, 3),
            "eta": self.eta(),
            "notes": self.notes,
            "can_run": not reasons,
            "reasons": reasons,
            "exit_code": 1 if reasons else 0,
        }

    def render(self) -> str:
        """The plan for a person."""
        cfg = self.cfg
        t = self.total
        n = self.sampling.get("n", 1)
        if self.all_ranks:
            scope = f"all {cfg.num_ranks} ranks"
        elif cfg.num_ranks > 1:
            scope = f"rank {self.ranks[0].rank} of {cfg.num_ranks}"
        else:
            scope = "one rank"
        source = cfg.source.label
        lines = [
            f"plan: {source} -> {cfg.output.path or '(no --output)'} ({scope})",
            f"  model: {self.model}, context {self.max_model_len:,} tokens "
            f"({self.max_model_len_from})",
        ]
        if self.all_ranks:
            for r in self.ranks:
                lines.append(
                    f"  rank {r.rank}: {_prompt_counts(r.input_prompts, r.committed_prompts, r.tally)}"
                    f" | {plural(r.tally.error_prompts, 'error row')} | "
                    f"{r.tally.prompt_tokens:,} prompt tokens"
                )
        inputs = _sum_known([r.input_prompts for r in self.ranks])
        lines.append(
            f"  prompts: {_prompt_counts(inputs, self.committed('committed_prompts'), t)}"
            f" ({plural(t.rows, 'output row')} with --n {n})"
        )
        if t.prompts:
            lines += self._todo_lines()
        lines += self._calibration_lines()
        if t.prompts:
            lines += self._eta_lines()
        lines += [f"  note: {note}" for note in self.notes]
        reasons = self.reasons()
        if reasons:
            lines += [f"cannot run: {reason}" for reason in reasons]
        elif t.prompts == 0:
            lines.append("can run: every prompt is already committed; a run would do nothing")
        else:
            lines.append(
                f"can run: {plural(t.engine_prompts, 'prompt')} to generate"
                + (f", {t.reused:,} reused (--reuse)" if t.reused else "")
                + (f", {plural(t.error_prompts, 'error row')}" if t.error_prompts else "")
            )
        return "\n".join(lines)

    def _todo_lines(self) -> list[str]:
        """Error rows, prompt tokens and output tokens of the prompts to do."""
        t = self.total
        lines = self._error_lines()
        stats = t.token_stats()
        if t.engine_prompts:
            pcts = ", ".join(f"p{q} {stats[f'p{q}']:,}" for q in PERCENTILES)
            lines.append(
                f"  prompt tokens: {stats['total']:,} over {plural(t.engine_prompts, 'prompt')} | "
                f"min {stats['min']:,}, mean {stats['mean']:,}, {pcts}, max {stats['max']:,}"
            )
        column = self.cfg.sampling.max_tokens_column
        budget = (
            f"each row's --max-tokens-column {column} (else {self.sampling['max_tokens']:,})"
            if column
            else f"max_tokens {self.sampling['max_tokens']:,}"
        )
        lines.append(
            f"  output tokens: at most {t.ceiling:,} ({budget} x "
            f"{plural(t.engine_prompts, 'prompt')} x n {self.sampling.get('n', 1)}, each capped "
            "by the context)"
        )
        expected = self.expected_output()
        if expected is None:
            lines.append(f"  expected output tokens: unknown ({self._no_measurement()})")
        else:
            lines.append(
                f"  expected output tokens: {expected[0]:,} ({expected[2]:,.1f} per output row, "
                f"from {expected[1]})"
            )
        return lines

    def _error_lines(self) -> list[str]:
        t = self.total
        if not t.error_prompts:
            return ["  error rows: none"]
        share = t.error_prompts / t.prompts
        lines = [
            f"  error rows: {t.error_prompts:,} of {plural(t.prompts, 'prompt')} to do "
            f"({share:.1%})"
        ]
        width = max(len(kind) for kind in t.errors)
        for kind, e in _by_count(t.errors):
            if kind == "over-long" and t.worst:
                worst = ", ".join(f"{i} ({n:,} tokens)" for n, i in t.worst_first())
                detail = f"longest: {worst}; the context is {self.max_model_len:,}"
            else:
                detail = f"e.g. {', '.join(e.examples)}: {e.message}"
            lines.append(f"    {kind:<{width}} {e.prompts:>6,}  {detail}")
        return lines

    def _no_measurement(self) -> str:
        if self.cfg.output.path:
            return f"no earlier run in {self.cfg.output.path}; --calibrate SECONDS measures one"
        return "no --output with an earlier run; --calibrate SECONDS measures one"

    def _calibration_lines(self) -> list[str]:
        c = self.calibration
        if c is None:
            return []
        overdue = (
            f" (longer than --calibrate {c.budget:g}s: the first prompt took "
            f"{c.first_seconds:,.1f}s to finish, and a calibration runs at least twice that)"
            if 2 * c.first_seconds > c.budget and not c.whole
            else ""
        )
        rates = ", ".join(f"{r:,.2f}" for r in c.window_rates())
        lines = [
            f"  calibration: {c.prompts:,} of {plural(c.sample, 'sampled prompt')} finished in "
            f"{c.seconds:,.1f}s on this machine{overdue}: {c.rate:,.2f} prompts/s, "
            f"{c.output_tokens / c.seconds:,.1f} output tok/s; engine start "
            f"{fmt_duration(c.engine_start_seconds, tenths=True)}",
            f"    spread: {plural(c.events, 'engine step')} finished prompts; in "
            f"{plural(len(c.windows), 'window')} ending on one: {rates} prompts/s",
        ]
        if c.whole:
            lines.append(
                "    the sample was every prompt to do: its time is measured, not estimated"
            )
        return lines

    def _eta_lines(self) -> list[str]:
        eta = self.eta()
        if eta is None:
            return [f"  ETA: none ({self._no_measurement()})"]
        if eta["from"] == "calibration":
            source = "from --calibrate on this machine"
        else:
            assert self.history is not None and self.history.rate is not None
            source = (
                f"from the last run's {self.history.rate:,.2f} prompts/s in {self.cfg.output.path}"
            )
        span = ""
        if eta["low"] is not None and eta["low"] != eta["high"]:
            span = f" ({fmt_duration(eta['low'], tenths=True)} to {fmt_duration(eta['high'], tenths=True)} at the windows' rates)"
        who = "all ranks on one such machine" if self.all_ranks else "the job"
        start = fmt_duration(eta["engine_start_seconds"], tenths=True)
        starts = (
            f"an engine start of {start}"
            if eta["per_rank"].keys() == {"0"}
            else (f"each rank's engine start of {start}")
        )
        lines = [
            f"  ETA: {fmt_duration(eta['seconds'], tenths=True)} for {who}{span}: "
            f"{fmt_duration(eta['generate_seconds'], tenths=True)} of generation and {starts}, "
            f"{source}"
        ]
        if self.all_ranks:
            per = ", ".join(
                f"rank {k} {fmt_duration(v, tenths=True)}" for k, v in eta["per_rank"].items()
            )
            lines.append(f"    per rank, each on its own such machine: {per}")
        return lines


def _by_count(errors: dict[str, ErrorKind]) -> list[tuple[str, ErrorKind]]:
    return sorted(errors.items(), key=lambda kv: (-kv[1].prompts, kv[0]))


def _sum_known(values: list[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _prompt_counts(inputs: int | None, committed: int, tally: Tally) -> str:
    total = f"{inputs:,} in the input" if inputs is not None else "input size unknown"
    return f"{total}, {committed:,} committed, {tally.prompts:,} to do"


def make_plan(cfg: RunConfig, all_ranks: bool = False, calibrate: float | None = None) -> Plan:
    """Plan this rank of `cfg` (or every rank), optionally calibrating on the real engine."""
    from pipeline.storage.outpath import is_store

    if cfg.output.path and is_store(cfg.output_dir):
        from pipeline.storage.preflight import preflight

        # One line within seconds for a wrong endpoint or bucket, before reads that retry.
        preflight(cfg.output_dir.store.loc, write=False)
    if cfg.engine.server is None:
        return _make_plan(cfg, all_ranks, calibrate, None)
    if calibrate:
        raise ConfigError(
            "--calibrate times the in-process engine; with --server, time a short run "
            "instead (batchgen run --server URL on a few hundred rows of the input, e.g. "
            "one Parquet file of it) and plan without --calibrate"
        )
    from pipeline.engines import open_engine

    # Asked as a run asks it: the served model, its tokenizer and context.
    with open_engine(cfg.engine, cfg.engine.model) as server:
        return _make_plan(cfg, all_ranks, calibrate, server)


def _make_plan(cfg: RunConfig, all_ranks: bool, calibrate: float | None, server: Any) -> Plan:
    from pipeline.job import read_job
    from pipeline.models import context_length

    reservoir = Reservoir(CALIBRATION_SAMPLE) if calibrate else None
    plan: Plan | None = None
    ranks = range(cfg.num_ranks) if all_ranks else [cfg.rank]
    # Read once (model, tokenizer, the input's listing); every other rank is a view of it.
    first = read_job(dataclasses.replace(cfg, rank=ranks[0]), server)
    for rank in ranks:
        job = first if rank == ranks[0] else _rank_job(first, rank)
        if plan is None:
            if server is not None and server.max_model_len is not None:
                max_len, max_len_from = server.max_model_len, f"the server's, {server.url}"
            elif server is not None and server.model_dir is None:
                raise BatchgenError(
                    f"--server {server.url} reports no context length and the model has no "
                    "local folder to read it from; pass --tokenizer with the model's folder"
                )
            elif cfg.engine.max_model_len is not None:
                max_len, max_len_from = cfg.engine.max_model_len, "--max-model-len"
            else:
                folder = job.model if server is None else server.model_dir
                max_len, key = context_length(folder, cfg.engine.trust_remote_code)
                max_len_from = f"the model's {key}; --max-model-len overrides"
            plan = Plan(cfg, job.model, job.sampling, max_len, max_len_from, [], Tally(max_len))
        job.builder.max_model_len = plan.max_model_len
        rank_plan = _rank_plan(cfg, rank, job.fingerprint, job.sampling.get("n", 1), plan)
        _tally_rank(cfg, job, rank_plan, plan, reservoir)
        rank_plan.input_prompts = job.source.total_rows
        rank_plan.done = Positions()  # counted; not kept
        plan.ranks.append(rank_plan)
        plan.total.merge(rank_plan.tally)
        if rank_plan.history is not None:
            plan.history = plan.history or History()
            plan.history.merge(rank_plan.history)
    assert plan is not None
    if reservoir is not None and calibrate:
        if not reservoir.rows:
            plan.notes.append("--calibrate: no prompt to do reaches the engine; nothing measured")
        else:
            c = calibrate_engine(
                cfg, plan.model, reservoir.rows, calibrate, reservoir.seen == len(reservoir.rows)
            )
            plan.calibration = c
            if c.engine_max_model_len != plan.max_model_len:
                plan.notes.append(
                    f"the engine's context is {c.engine_max_model_len:,} tokens, not "
                    f"{plan.max_model_len:,} as read from the model's config; plan again with "
                    f"--max-model-len {c.engine_max_model_len} for exact over-long counts"
                )
    return plan


def _rank_job(job: Any, rank: int) -> Any:
    """Another rank of the same job (a pipeline.job.Job): its slice of the input, from the
    same listing, and its fingerprint."""
    return dataclasses.replace(
        job, source=job.source.for_rank(rank), fingerprint=for_rank(job.fingerprint, rank)
    )


def _tally_rank(
    cfg: RunConfig, job: Any, rank_plan: RankPlan, plan: Plan, reservoir: Reservoir | None
) -> None:
    """Count a rank's requests still to do, as the run builds them (--reuse lookups included)."""
    from pipeline.reuse.run import planned_reuse
    from pipeline.stages import request_batches

    with planned_reuse(job.fingerprint, cfg.reuse, rank_plan.rank) as reuse:
        batches = request_batches(
            job.source,
            job.builder,
            rank_plan.done,
            cfg.source.id_column,
            annotate=reuse.annotate,
        )
        for rows in batches:
            rank_plan.tally.add(rows)
            if reservoir is not None:  # calibration times the engine: reused rows skip it
                reservoir.add([r for r in rows if r.reused is None])
        plan.notes += [n for n in reuse.counts.skipped if n not in plan.notes]


def _rank_plan(
    cfg: RunConfig, rank: int, fingerprint: dict[str, Any], n: int, plan: Plan
) -> RankPlan:
    """What --output holds for one rank, read without changing anything."""
    rank_plan = RankPlan(rank, None, 0, 0, 0, Tally(plan.max_model_len), None, [], None)
    if not cfg.output.path or not cfg.output_dir.is_dir():
        return rank_plan
    preview = preview_resume(cfg.output_dir, rank, fingerprint)
    rank_plan.holder = lock_holder(cfg.output_dir, rank)
    if preview.refused:
        if not cfg.output.overwrite:  # --overwrite: a run removes the other run's files
            rank_plan.refused = preview.refused
        return rank_plan
    if preview.manifest is not None:
        # The same settings: its outputs and rate describe this job, even under --overwrite.
        rank_plan.history = _history(preview.manifest, n)
    if not cfg.output.overwrite:
        rank_plan.done = preview.done
        rank_plan.committed_prompts = preview.done.count()
        rank_plan.committed_rows = sum(s["rows"] for s in preview.shards)
        rank_plan.committed_errors = sum(s["errors"] for s in preview.shards)
    return rank_plan


def _history(manifest: Manifest, n: int) -> History:
    """Stop behaviour over every committed shard, and the last run's rate."""
    h = History()
    for s in manifest.shards:
        h.samples += s["rows"] - s["errors"]
        h.completion_tokens += s["completion_tokens"]
        h.finish_reasons.update({k: v for k, v in s["finish_reasons"].items() if k != "error"})
    last = (manifest.report or {}).get("this_run") or {}
    prompts, seconds = last.get("prompts") or 0, last.get("generate_seconds") or 0.0
    engine_prompts = prompts - (last.get("errors") or 0) // max(n, 1)
    if engine_prompts > 0 and seconds > 0:
        h.last_prompts, h.last_seconds = engine_prompts, float(seconds)
        h.last_start_seconds = float(last.get("engine_start_seconds") or 0.0)
    return h
