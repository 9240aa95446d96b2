"""`batchgen status OUT`: what each rank of an output folder has committed and whether it is done.

It only reads: the per-rank manifest summaries (each written atomically, so never seen
half-written) and the rank locks, probed without taking them for more than an instant. A
manifest says "running" until its process ends; whether that process is alive is the lock's to
say, since the kernel drops a lock whatever way its process died. So "running" under a free
lock means "crashed".

What it reads of a rank does not grow with its shards: the head of its newest manifest
generation and its newest commit record, which carry the rank's totals (`RankSummary.load`),
and for a rank not running one listing of its shard folder, checked against a digest of the
names the totals count. Only where that check fails (a shard committed just before a crash, one
deleted by hand) is the rank's shard list read, to name the unlisted shards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.checkpoint import (
    STATE_DIR,
    Manifest,
    RankSummary,
    lock_holder,
    manifest_path,
    read_job_record,
)
from pipeline.errors import EXIT_OK, EXIT_STATUS_FAILED, EXIT_STATUS_INCOMPLETE, BatchgenError
from pipeline.fleet import STALLED_AFTER, fleet_view, render_fleet
from pipeline.humanize import fmt_duration
from pipeline.humanize import plural as _plural
from pipeline.rankstate import legacy_manifest_path, shard_names_crc, state_ranks
from pipeline.report import requests_line, reuse_line
from pipeline.sinks import SHARD_RE, list_names, rank_dir

# A rank's state, and what `batchgen status` says about it.
STATE_LABELS = {
    "finished": "finished",
    "running": "running",
    "interrupted": "interrupted (rerun to resume)",
    "crashed": "crashed (rerun to resume)",
    "failed": "failed (fix the error below, then rerun to resume)",
    "not_started": "not started",
}
# Up to this many ranks, the text view has a block per rank; beyond, the fleet view
# (pipeline/fleet.py) and the all-ranks line, with every rank in --json.
DETAIL_RANKS = 16


@dataclass(slots=True)
class RankStatus:
    """One rank: its manifest summary (None if it never started) and the live holder of its
    lock."""

    rank: int
    state: str  # a key of STATE_LABELS
    manifest: RankSummary | None
    holder: str | None
    # Complete shards on disk the manifest does not list (a crash between a shard's rename and
    # the manifest update): readers already see their rows; the next run adopts them.
    unlisted: list[str] = field(default_factory=list)

    def label(self) -> str:
        if self.state == "running":
            return f"running ({self.holder})"
        if self.state == "interrupted" and self.manifest and self.manifest.report.get("signal"):
            return f"interrupted by {self.manifest.report['signal']} (rerun to resume)"
        if (
            self.state == "interrupted"
            and self.manifest
            and self.manifest.report.get("stop_reason")
        ):
            return "interrupted by batchgen itself (rerun to resume)"
        return STATE_LABELS[self.state]

    def to_dict(self, now: float) -> dict[str, Any]:
        m = self.manifest
        out: dict[str, Any] = {"rank": self.rank, "state": self.state, "holder": self.holder}
        if m is None:
            return out
        report = m.report or {}
        out.update(
            manifest_status=m.status,
            prompts=m.prompts_committed,
            total_prompts=m.total_prompts,
            rows=m.rows_committed,
            shards=m.totals.shards,
            errors=m.errors,
            **_token_totals([m]),
            started_at=m.started_at,
            updated_at=m.updated_at,
            age_seconds=round(max(now - m.updated_at, 0.0), 1),
            host=m.host,
            pid=m.pid,
            error=report.get("error"),
            last_run=report.get("this_run"),
            engine_failures=report.get("engine_failures", []),
            unlisted_shards=self.unlisted,
        )
        return out


@dataclass(slots=True)
class RunStatus:
    """Every rank of one output folder, as `batchgen status` reports it."""

    out_dir: Path
    num_ranks: int
    ranks: list[RankStatus]
    now: float
    stalled_after: float = STALLED_AFTER

    def is_stalled(self, r: RankStatus) -> bool:
        """A live rank that has committed nothing (no shard, no start) for `stalled_after`."""
        m = r.manifest
        return (
            r.state == "running" and m is not None and self.now - m.updated_at > self.stalled_after
        )

    @property
    def state(self) -> str:
        """finished (every rank), failed (any rank), else incomplete."""
        states = {r.state for r in self.ranks}
        if "failed" in states:
            return "failed"
        return "finished" if states == {"finished"} else "incomplete"

    @property
    def exit_code(self) -> int:
        return {
            "finished": EXIT_OK,
            "incomplete": EXIT_STATUS_INCOMPLETE,
            "failed": EXIT_STATUS_FAILED,
        }[self.state]

    def to_dict(self) -> dict[str, Any]:
        started = [r.manifest for r in self.ranks if r.manifest is not None]
        known = all(m.total_prompts is not None for m in started) and len(started) == len(
            self.ranks
        )
        counts: dict[str, int] = {}
        for r in self.ranks:
            counts[r.state] = counts.get(r.state, 0) + 1
        return {
            "output": str(self.out_dir),
            "state": self.state,
            "exit_code": self.exit_code,
            "num_shards": self.num_ranks,  # the rank count, spelled like --num-shards
            "ranks": [r.to_dict(self.now) for r in self.ranks],
            "all": {
                "prompts": sum(m.prompts_committed for m in started),
                "total_prompts": sum(m.total_prompts for m in started) if known else None,
                "rows": sum(m.rows_committed for m in started),
                "shards": sum(m.totals.shards for m in started),
                "errors": sum(m.errors for m in started),
                **_token_totals(started),
                "states": counts,
                "last_run_reuse": _reuse_totals(started),
            },
            "fleet": fleet_view(self),
        }

    def render(self) -> str:
        """The human-readable report: one block per rank (the fleet view instead, beyond
        DETAIL_RANKS ranks), then a line for all ranks."""
        total = self.to_dict()["all"]
        states = ", ".join(
            f"{total['states'][s]:,} {s.replace('_', ' ')}"
            for s in STATE_LABELS
            if s in total["states"]
        )
        all_line = (
            f"all {_plural(len(self.ranks), 'rank')}: {self.state} | "
            f"{_prompts(total['prompts'], total['total_prompts'])}, {total['rows']:,} rows in "
            f"{_plural(total['shards'], 'shard')} | {_plural(total['errors'], 'error')} | "
            f"{states}"
        )
        if len(self.ranks) > DETAIL_RANKS:
            return "\n".join([all_line, *render_fleet(fleet_view(self), self.now)])
        return "\n".join([*self._rank_blocks(), all_line])

    def _rank_blocks(self) -> list[str]:
        lines = []
        for r in self.ranks:
            m = r.manifest
            if m is None:
                lines.append(f"rank {r.rank}: {r.label()}")
                continue
            stalled = ", stalled" if self.is_stalled(r) else ""
            lines.append(
                f"rank {r.rank}: {r.label()}{stalled} | "
                f"{_prompts(m.prompts_committed, m.total_prompts)}, "
                f"{m.rows_committed:,} rows in {_plural(m.totals.shards, 'shard')} | "
                f"{_plural(m.errors, 'error')} | "
                f"updated {fmt_duration(max(self.now - m.updated_at, 0.0))} ago"
            )
            detail = []
            if m.totals.shards:
                tokens = _token_totals([m])
                detail.append(
                    f"tokens: {tokens['prompt_tokens']:,} prompt + "
                    f"{tokens['completion_tokens']:,} output | finish reasons: "
                    + _reasons(tokens["finish_reasons"])
                )
            detail += _last_run_lines((m.report or {}).get("this_run") or {})
            if r.state == "interrupted" and (m.report or {}).get("stop_reason"):
                detail.append(f"stopped because {m.report['stop_reason']}")
            deaths = (m.report or {}).get("engine_failures") or []
            if deaths:
                restarted = sum(1 for d in deaths if d.get("restarted"))
                detail.append(
                    f"engine died {_plural(len(deaths), 'time')} in the last run, restarted "
                    f"{restarted}; last cause: {deaths[-1]['cause']}"
                )
            if r.unlisted:
                detail.append(
                    f"{_plural(len(r.unlisted), 'shard')} on disk not yet in the manifest "
                    f"({', '.join(r.unlisted)}): committed just before a crash; the next run "
                    f"adopts {'it' if len(r.unlisted) == 1 else 'them'}"
                )
            lines += [f"  {d}" for d in detail]
            if r.state == "failed" and m.report.get("error"):
                lines.append(f"  error: {m.report['error']}")
        return lines


def read_status(out_dir: Path, stalled_after: float = STALLED_AFTER) -> RunStatus:
    """The status of every rank of `out_dir`; BatchgenError if it holds no batchgen run. The
    rank count is the job record's (so ranks that never started are counted), else the
    largest a manifest records."""
    if not out_dir.is_dir():
        raise BatchgenError(f"{out_dir}: no such folder; give the --output folder of a run")
    found = set(state_ranks(out_dir))
    if legacy_manifest_path(out_dir, 0).exists():
        raise BatchgenError(
            f"{out_dir} was written by an earlier batchgen (a flat folder of shards, "
            f"{STATE_DIR}/rank-*.json); use that version's `batchgen status`"
        )
    if not found:
        raise BatchgenError(
            f"{out_dir}: no batchgen run there (no {STATE_DIR}/rank-*/); give the "
            "--output folder of a run"
        )
    now = time.time()
    ranks = {rank: _rank_status(out_dir, rank) for rank in sorted(found)}
    job = read_job_record(out_dir) or {}
    num_ranks = max(
        [r.manifest.num_ranks for r in ranks.values() if r.manifest is not None]
        + [max(found) + 1, job.get("fingerprint", {}).get("num_shards") or 0]
    )
    for rank in range(num_ranks):  # ranks of the run that never wrote anything yet
        ranks.setdefault(rank, RankStatus(rank, "not_started", None, None))
    return RunStatus(out_dir, num_ranks, [ranks[k] for k in sorted(ranks)], now, stalled_after)


def _rank_status(out_dir: Path, rank: int) -> RankStatus:
    # The lock first: a process that starts after the probe shows as whatever its manifest says,
    # never as crashed, because a "running" manifest under a free lock is probed once more.
    holder = lock_holder(out_dir, rank)
    manifest = RankSummary.load(out_dir, rank)
    if holder is None and manifest is not None and manifest.status == "running":
        holder = lock_holder(out_dir, rank)
    if holder is not None:
        state = "running"
    elif manifest is None:
        state = "not_started"
    elif manifest.status == "running":
        state = "crashed"
    else:
        state = manifest.status
    if state not in STATE_LABELS:
        raise BatchgenError(
            f"{manifest_path(out_dir, rank)} has an unknown status {state!r}; expected one of: "
            "running, finished, interrupted, failed"
        )
    unlisted: list[str] = []
    if manifest is not None and state != "running":  # a live writer lists its shard a moment later
        names = _shard_names(out_dir, rank)
        totals = manifest.totals
        if len(names) != totals.shards or shard_names_crc(names) != totals.names_crc:
            full = Manifest.load(out_dir, rank)
            listed = {s["file"] for s in full.shards} if full is not None else set()
            unlisted = [n for n in names if n not in listed]
    return RankStatus(rank, state, manifest, holder, unlisted)


def _shard_names(out_dir: Path, rank: int) -> list[str]:
    """The shard file names in a rank's folder (`sinks.shard_files` without a Path each: at
    1,000 ranks of many shards, status lists names only)."""
    return [n for n in list_names(rank_dir(out_dir, rank)) if SHARD_RE.match(n)]


def _reuse_totals(manifests: list[RankSummary]) -> dict[str, int] | None:
    """Prompts generated, reused and deduplicated by the last run of each rank, summed."""
    reports = [r for m in manifests if (r := ((m.report or {}).get("this_run") or {}).get("reuse"))]
    if not reports:
        return None
    names = ("generated_prompts", "reused_prompts", "duplicate_prompts", "engine_requests")
    return {k: sum(r.get(k) or 0 for r in reports) for k in names}


def _token_totals(manifests: list[RankSummary]) -> dict[str, Any]:
    """Tokens and finish reasons over every committed shard (all runs, not just the last)."""
    reasons: dict[str, int] = {}
    prompt_tokens = completion_tokens = 0
    for m in manifests:
        prompt_tokens += m.totals.prompt_tokens
        completion_tokens += m.totals.completion_tokens
        for k, v in m.totals.finish_reasons.items():
            reasons[k] = reasons.get(k, 0) + v
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "finish_reasons": dict(sorted(reasons.items())),
    }


def _last_run_lines(this_run: dict[str, Any]) -> list[str]:
    """What the last run of a rank did: its rate, a server's requests, what it reused."""
    lines = []
    if this_run.get("generate_seconds"):
        lines.append(
            f"last run: {this_run['prompts']:,} prompts in "
            f"{fmt_duration(this_run['generate_seconds'], tenths=True)} of generation, "
            f"{this_run['output_tokens_per_second'] or 0:,.1f} output tok/s"
        )
    requests = this_run.get("requests")
    if requests:
        lines.append(f"server requests in the last run: {requests_line(requests)}")
    reuse = this_run.get("reuse")
    if reuse and (reuse["reused_prompts"] or reuse["duplicate_prompts"] or reuse["sources"]):
        lines.append(f"last run: {reuse_line(reuse)}")
    return lines


def _prompts(done: int, total: int | None) -> str:
    if total is None:
        return f"{done:,} prompts"
    pct = 100.0 * done / total if total else 100.0
    return f"{done:,}/{total:,} prompts ({pct:.1f}%)"


def _reasons(reasons: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in reasons.items()) or "none"
