"""The fleet view of `batchgen status`: what an operator of a job of many ranks needs first.

Ranks by state (a running rank with no commit for `--stalled-after` seconds is stalled), the
ranks to act on (failed, crashed, stalled, not started), the slowest running ranks and the
projected finish. Computed from what `pipeline.status` already read (one manifest summary per
rank), so it costs nothing that grows with the shards of a rank.

Rates: a running rank's rate is the prompts its current run committed over the time since that
run began generating (its newest shard's commit time less the generation seconds it records;
`RankTotals.run_rate`), so a rank that stops committing slows down in the view as time passes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pipeline.humanize import fmt_duration
from pipeline.humanize import plural as _plural

if TYPE_CHECKING:
    from pipeline.status import RankStatus, RunStatus

STALLED_AFTER = 600.0  # seconds without a commit before a running rank is called stalled
SLOWEST = 5  # running ranks listed as the slowest
LISTED = 10  # ranks listed by number in one line of the text view, then "and N more"


def fleet_view(status: RunStatus) -> dict[str, Any]:
    """The fleet summary of `status` as JSON-ready values (see the module docstring)."""
    now = status.now
    by_state: dict[str, list[int]] = {}
    for r in status.ranks:
        by_state.setdefault(r.state, []).append(r.rank)
    stalled = [r for r in status.ranks if status.is_stalled(r)]
    running = [r for r in status.ranks if r.state == "running" and r.manifest is not None]
    paces = sorted((p for r in running if (p := _pace(r, now))), key=_slowness, reverse=True)
    rate = sum(p["prompts_per_s"] or 0.0 for p in paces)
    remaining = _remaining(status)
    eta = remaining / rate if rate > 0 and remaining is not None else None
    return {
        "ranks": len(status.ranks),
        "finished": len(by_state.get("finished", [])),
        "running": len(by_state.get("running", [])),
        "stalled": [r.rank for r in stalled],
        "stalled_after_seconds": status.stalled_after,
        "failed": by_state.get("failed", []),
        "crashed": by_state.get("crashed", []),
        "interrupted": by_state.get("interrupted", []),
        "not_started": by_state.get("not_started", []),
        "slowest": paces[:SLOWEST],
        "prompts_per_s": round(rate, 2),
        "remaining_prompts": remaining,
        "projected_seconds": round(eta, 1) if eta is not None else None,
        "projected_finish": round(now + eta, 1) if eta is not None else None,
    }


def _pace(r: RankStatus, now: float) -> dict[str, Any] | None:
    m = r.manifest
    assert m is not None
    rate = m.totals.run_rate(now)
    left = None if m.total_prompts is None else max(m.total_prompts - m.prompts_committed, 0)
    eta = left / rate if rate and left is not None else None
    return {
        "rank": r.rank,
        "prompts": m.prompts_committed,
        "total_prompts": m.total_prompts,
        "prompts_per_s": round(rate, 2) if rate is not None else None,
        "eta_seconds": round(eta, 1) if eta is not None else None,
    }


def _slowness(pace: dict[str, Any]) -> tuple[float, float]:
    """Longest to go first; a rank without a rate yet (or a total) sorts first of all."""
    eta = pace["eta_seconds"]
    return (float("inf") if eta is None else eta, -(pace["prompts_per_s"] or 0.0))


def _remaining(status: RunStatus) -> int | None:
    """Prompts not yet committed over every rank; ranks not started count as the mean of the
    started ones' totals. None when no started rank knows its total."""
    totals = [r.manifest.total_prompts for r in status.ranks if r.manifest is not None]
    known = [t for t in totals if t is not None]
    if not known:
        return None
    mean = sum(known) / len(known)
    left = 0.0
    for r in status.ranks:
        m = r.manifest
        total = mean if m is None or m.total_prompts is None else m.total_prompts
        left += max(total - (m.prompts_committed if m is not None else 0), 0)
    return round(left)


def render_fleet(view: dict[str, Any], now: float) -> list[str]:
    """The fleet view as lines of text: states, ranks to act on, slowest, projected finish."""
    lines = [
        f"fleet: {view['finished']:,} finished, {view['running']:,} running "
        f"({len(view['stalled']):,} stalled), {len(view['failed']):,} failed, "
        f"{len(view['crashed']):,} crashed, {len(view['interrupted']):,} interrupted, "
        f"{len(view['not_started']):,} not started"
    ]
    after = fmt_duration(view["stalled_after_seconds"])
    for key, what in (
        ("failed", "failed (see `batchgen status --json` for each error; fix, then rerun)"),
        ("stalled", f"stalled (running, no commit for {after} or more)"),
        ("crashed", "crashed (rerun to resume)"),
        ("interrupted", "interrupted (rerun to resume)"),
        ("not_started", "not started"),
    ):
        if view[key]:
            lines.append(f"  {what}: {_rank_list(view[key])}")
    if view["slowest"]:
        lines.append("  slowest running: " + "; ".join(_pace_text(p) for p in view["slowest"]))
    lines.append(_projection(view, now))
    return lines


def _rank_list(ranks: list[int]) -> str:
    """`3 ranks: 4, 9-10`: sorted ranks as runs, the first LISTED runs, then how many more."""
    runs: list[list[int]] = []
    for r in sorted(ranks):
        if runs and runs[-1][1] == r - 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:LISTED])
    more = f" and {len(runs) - LISTED:,} more runs of ranks" if len(runs) > LISTED else ""
    return f"{_plural(len(ranks), 'rank')}: {shown}{more}"


def _pace_text(p: dict[str, Any]) -> str:
    done = f"{p['prompts']:,}" + (f"/{p['total_prompts']:,}" if p["total_prompts"] else "")
    rate = "no shard yet" if p["prompts_per_s"] is None else f"{_rate(p['prompts_per_s'])}/s"
    eta = "" if p["eta_seconds"] is None else f", {fmt_duration(p['eta_seconds'])} to go"
    return f"rank {p['rank']} {done} at {rate}{eta}"


def _projection(view: dict[str, Any], now: float) -> str:
    if view["remaining_prompts"] == 0:
        return "  projected finish: nothing left to generate"
    if view["projected_seconds"] is None:
        why = "no rank is running" if not view["running"] else "no running rank has a rate yet"
        return f"  projected finish: unknown ({why})"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(view["projected_finish"]))
    return (
        f"  projected finish: {when} (in {fmt_duration(view['projected_seconds'])}): "
        f"{view['remaining_prompts']:,} prompts left at the running ranks' "
        f"{_rate(view['prompts_per_s'])} prompts/s, if the ranks not running are started too"
    )


def _rate(per_s: float) -> str:
    """Prompts per second, to two figures below 10 (a slow rank's 0.02/s is not 0.0)."""
    return f"{per_s:.2f}" if per_s < 10 else f"{per_s:,.1f}"
