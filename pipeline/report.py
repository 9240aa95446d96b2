"""The report of one run: what it did, how fast, and what its output folder now holds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.checkpoint import Checkpoint
from pipeline.engines import Engine, StopFlags
from pipeline.progress import Progress, fmt_duration

log = logging.getLogger("batchgen")


def run_report(
    status: str,
    progress: Progress,
    engine: Engine,
    gen_seconds: float,
    wall_seconds: float,
    checkpoint: Checkpoint,
    flags: StopFlags,
) -> dict[str, Any]:
    """What a run did, as recorded in its manifest and shown by `batchgen status`."""
    manifest = checkpoint.manifest
    report = {
        "status": status,
        "signal": flags.signal_name,
        "stop_reason": flags.reason,
        "this_run": {
            "prompts": progress.prompts,
            "rows": progress.rows,
            "errors": progress.errors,
            "prompt_tokens": progress.prompt_tokens,
            "prompt_tokens_cached": progress.cached_tokens,
            "completion_tokens": progress.completion_tokens,
            "finish_reasons": dict(sorted(progress.finish_reasons.items())),
            "engine_start_seconds": round(engine.start_seconds, 2),
            "generate_seconds": round(gen_seconds, 2),
            "wall_seconds": round(wall_seconds, 2),
            "output_tokens_per_second": round(progress.completion_tokens / gen_seconds, 1)
            if gen_seconds > 0
            else None,
        },
        "committed": {
            "prompts": manifest.prompts_committed,
            "rows": manifest.rows_committed,
            "errors": manifest.errors,
            "shards": len(manifest.shards),
            "total_prompts": manifest.total_prompts,
        },
        "engine": engine.describe(),
    }
    request_stats = getattr(engine, "request_stats", None)  # engines that make requests
    if request_stats is not None:
        report["this_run"]["requests"] = request_stats()
    return report


def log_summary(report: dict[str, Any], out_dir: Path, headline: str | None = None) -> None:
    """The run's last two log lines: what this run did, and what the folder holds. The first
    starts with the run's status, or with `headline` (a run that stopped at its --limit is
    "interrupted" in the manifest, for the rerun that does the rest, but was not interrupted)."""
    this, committed = report["this_run"], report["committed"]
    reasons = ", ".join(f"{k} {v:,}" for k, v in this["finish_reasons"].items()) or "none"
    log.info(
        "%s: %s prompts this run (%s rows, %s errors) | %s prompt + %s output tokens | "
        "generate %s, engine start %s, wall %s | %s output tok/s | finish reasons: %s",
        headline or report["status"],
        f"{this['prompts']:,}",
        f"{this['rows']:,}",
        f"{this['errors']:,}",
        f"{this['prompt_tokens']:,}",
        f"{this['completion_tokens']:,}",
        fmt_duration(this["generate_seconds"]),
        fmt_duration(this["engine_start_seconds"]),
        fmt_duration(this["wall_seconds"]),
        f"{this['output_tokens_per_second'] or 0:,.1f}",
        reasons,
    )
    requests = this.get("requests")
    if requests:
        log.info("server requests: %s", requests_line(requests))
    reuse = this.get("reuse")
    if reuse and (reuse["reused_prompts"] or reuse["duplicate_prompts"] or reuse["sources"]):
        log.info("reuse: %s", reuse_line(reuse))
    log_output(committed, out_dir)


def log_output(committed: dict[str, Any], out_dir: Path, ranks: int | None = None) -> None:
    """The last log line: what the output folder holds (of `ranks` ranks, for a node's run)."""
    total = committed["total_prompts"]
    log.info(
        "output: %s prompts committed%s in %d shard(s)%s under %s",
        f"{committed['prompts']:,}",
        f" of {total:,}" if total is not None else "",
        committed["shards"],
        f" of {ranks} rank(s)" if ranks is not None else "",
        out_dir,
    )


def requests_line(requests: dict[str, Any]) -> str:
    """A server run's requests in one line: sent, retried (by reason), rows the server failed."""
    reasons = ", ".join(f"{k} {v:,}" for k, v in requests["retry_reasons"].items())
    return (
        f"{requests['requests']:,} sent, {requests['retries']:,} retried"
        + (f" ({reasons})" if reasons else "")
        + f", {requests['refused_rows']:,} row(s) refused, {requests['failed_rows']:,} row(s) "
        "failed after retries"
    )


def reuse_line(reuse: dict[str, Any]) -> str:
    """Prompts generated, reused from earlier folders and answered by an identical request."""
    requests = reuse.get("engine_requests")
    return (
        f"{reuse['generated_prompts']:,} prompts generated, {reuse['reused_prompts']:,} reused"
        + (f" from {', '.join(reuse['sources'])}" if reuse["sources"] else "")
        + f", {reuse['duplicate_prompts']:,} identical to another row's request"
        + ("" if requests is None else f"; the engine took {requests:,} requests")
    )
