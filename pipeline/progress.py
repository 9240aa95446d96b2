"""What the user sees while a run goes: a live line on a terminal, a plain line now and then in
a log (cron, Slurm), and a summary at the end. Everything goes to stderr.

A rank started by `--data-parallel` writes no line of its own: its Progress sends JSON snapshots
down a pipe to the launcher, whose NodeProgress sums every rank's into one line, and prints the
ranks' log lines above it.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from pipeline.humanize import fmt_duration
from pipeline.records import ResultRow

if TYPE_CHECKING:
    from pipeline.metrics import MetricsFile

T = TypeVar("T")

# How often a rank of a --data-parallel run sends its counts to the launcher (a few bytes each).
SNAPSHOT_SECONDS = 0.5


def _default_interval(live: bool) -> float:
    return 0.5 if live else 30.0


def progress_line(
    done: int,
    total: int | None,
    out_tok_s: float,
    errors: int,
    eta: float | None,
    elapsed: float,
    ranks: str | None = None,
) -> str:
    """One progress line: prompts done (of the total, when known), throughput, ETA, elapsed."""
    if total is not None:
        pct = 100.0 * done / total if total else 100.0
        parts = [f"{done:,}/{total:,} prompts ({pct:.1f}%)"]
    else:
        parts = [f"{done:,} prompts"]
    if ranks:
        parts.append(ranks)
    parts.append(f"{out_tok_s:,.0f} out tok/s")
    if errors:
        parts.append(f"{errors:,} errors")
    if eta is not None:
        parts.append(f"ETA {fmt_duration(max(eta, 0))}")
    parts.append(f"elapsed {fmt_duration(elapsed)}")
    return " | ".join(parts)


class Progress:
    """Counts prompts and tokens as results arrive and prints at most every `interval` seconds;
    with `report_fd` (a rank of --data-parallel), sends JSON snapshots there instead."""

    def __init__(
        self,
        todo: int | None,
        done_before: int,
        stream: TextIO | None = None,
        interval: float | None = None,
        report_fd: int | None = None,
        metrics: MetricsFile | None = None,
        restarts: Callable[[], int] | None = None,
    ) -> None:
        self.metrics, self.restarts = metrics, restarts  # --metrics-textfile, engine restarts
        self.stream = stream or sys.stderr
        self.channel: TextIO | None = None
        if report_fd is not None:
            self.channel = open(report_fd, "w", buffering=1, closefd=False)  # noqa: SIM115
        self.live = self.channel is None and self.stream.isatty()
        if self.channel is not None:
            interval = SNAPSHOT_SECONDS
        self.interval = interval if interval is not None else _default_interval(self.live)
        self.todo = todo  # prompts this run must still do, when known
        self.done_before = done_before
        self.prompts = self.rows = self.errors = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens the prefix cache served (where the engine says)
        self.finish_reasons: dict[str, int] = {}
        self.sent = self.returned = 0  # prompts handed to the engine, and back from it
        self.started = time.monotonic()
        self._last = 0.0
        self._width = 0
        if self.channel is not None:
            self._send(self.started)  # the launcher learns the rank's total before any result

    def count_sent(self, feed: Iterator[T | None]) -> Iterator[T | None]:
        """`feed` as the engine pulls it, counting the prompts it hands over (None: none ready)."""
        for row in feed:
            if row is not None:
                self.sent += 1
            yield row

    def count_returned(self, results: list[ResultRow]) -> None:
        """The engine's results, before duplicates are expanded: its prompts that came back."""
        self.returned += sum(1 for r in results if r.sample_index == 0)

    def add(self, results: list[ResultRow]) -> None:
        for r in results:
            self.rows += 1
            if r.sample_index == 0:
                self.prompts += 1
                if r.error is None:
                    self.prompt_tokens += r.prompt_tokens or 0
                    self.cached_tokens += r.cached_tokens or 0
            if r.error is not None:
                self.errors += 1
                reason = "error"
            else:
                self.completion_tokens += r.completion_tokens or 0
                reason = r.finish_reason or "unknown"
            self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.write(self.metric_values(now), now)
        if now - self._last >= self.interval:
            self._last = now
            if self.channel is not None:
                self._send(now)
            else:
                self._print(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        eta = None
        if self.todo and self.prompts:
            eta = (self.todo - self.prompts) * elapsed / self.prompts
        return progress_line(
            self.done_before + self.prompts,
            None if self.todo is None else self.done_before + self.todo,
            self.completion_tokens / elapsed,
            self.errors,
            eta,
            elapsed,
        )

    def snapshot(self, now: float | None = None, final: bool = False) -> dict[str, Any]:
        """The counts a rank sends to the --data-parallel launcher."""
        return {
            "todo": self.todo,
            "done_before": self.done_before,
            "prompts": self.prompts,
            "rows": self.rows,
            "errors": self.errors,
            "completion_tokens": self.completion_tokens,
            "elapsed": round((now or time.monotonic()) - self.started, 3),
            "final": final,
        }

    def metric_values(self, now: float) -> dict[str, Any]:
        """The values of pipeline/metrics.py's METRICS."""
        elapsed = max(now - self.started, 1e-9)
        return {
            "batchgen_rows_total": self.rows,
            "batchgen_prompts_total": self.done_before + self.prompts,
            "batchgen_prompt_tokens_total": self.prompt_tokens,
            "batchgen_prompt_tokens_cached_total": self.cached_tokens,
            "batchgen_completion_tokens_total": self.completion_tokens,
            "batchgen_error_rows_total": self.errors,
            "batchgen_engine_restarts_total": self.restarts() if self.restarts else None,
            "batchgen_requests_in_flight": self.sent - self.returned,
            "batchgen_rows_per_second": round(self.rows / elapsed, 3),
            "batchgen_prompts_todo": None if self.todo is None else self.todo - self.prompts,
        }

    def _send(self, now: float, final: bool = False) -> None:
        assert self.channel is not None
        try:
            self.channel.write(json.dumps(self.snapshot(now, final)) + "\n")
        except (OSError, ValueError):
            # The launcher is gone (it then stops this rank too); progress is only information.
            self.channel = None

    def _print(self, now: float) -> None:
        text = f"batchgen: {self.line(now)}"
        if self.live:
            pad = max(self._width - len(text), 0)
            self._width = len(text)
            self.stream.write("\r" + text + " " * pad)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.metrics is not None:
            now = time.monotonic()
            # The engine loop has ended: prompts it never gave back (dropped at a stop, redone
            # on resume) are no longer in flight.
            values = {**self.metric_values(now), "batchgen_requests_in_flight": 0}
            self.metrics.write(values, now, final=True)
        if self.channel is not None:
            self._send(time.monotonic(), final=True)
        elif self.live and self._width:
            self.stream.write("\n")
            self.stream.flush()


class _RankCounts:
    """The latest snapshot of one rank, and when (on the launcher's clock) it began generating."""

    __slots__ = ("snapshot", "gen_start", "gen_end")

    def __init__(self, snapshot: dict[str, Any], now: float) -> None:
        self.snapshot = snapshot
        self.gen_start = now - snapshot["elapsed"]
        self.gen_end = now

    def rate(self, key: str) -> float:
        return self.snapshot[key] / max(self.snapshot["elapsed"], 1e-9)


class NodeProgress:
    """The one terminal of a --data-parallel run: the ranks' log lines, each on its own line,
    and below them one progress line summed over the ranks (live on a terminal, else every
    `interval` seconds). Thread-safe: the launcher's reader threads call `log` and `update`."""

    def __init__(
        self, num_ranks: int, stream: TextIO | None = None, interval: float | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.interval = interval if interval is not None else _default_interval(self.live)
        self.num_ranks = num_ranks
        self.started = time.monotonic()
        self.counts: dict[int, _RankCounts] = {}
        self.running: set[int] = set()
        self.ended: set[int] = set()
        self.finished: dict[int, int] = {}  # rank: prompts, of ranks that ended finished
        self._lock = threading.Lock()
        self._last = time.monotonic()  # the first line after one interval, not at once
        self._shown = ""  # the live line now on the terminal

    def rank_started(self, rank: int) -> None:
        with self._lock:
            self.running.add(rank)

    def rank_ended(self, rank: int, finished_prompts: int | None = None) -> None:
        """A rank's process ended; `finished_prompts`: it is finished and holds that many (what
        a rank with nothing left to do, which sends no counts, adds to the line)."""
        with self._lock:
            self.running.discard(rank)
            self.ended.add(rank)
            if finished_prompts is not None:
                self.finished[rank] = finished_prompts

    def update(self, rank: int, snapshot: dict[str, Any]) -> None:
        now = time.monotonic()
        with self._lock:
            counts = self.counts.get(rank)
            if counts is None:
                self.counts[rank] = _RankCounts(snapshot, now)
            else:
                counts.snapshot, counts.gen_end = snapshot, now

    def log(self, text: str) -> None:
        """Print one log line above the live progress line."""
        with self._lock:
            if self._shown:
                self.stream.write("\r" + " " * len(self._shown) + "\r")
            self.stream.write(text + "\n")
            if self._shown:
                self.stream.write(self._shown)
            self.stream.flush()

    def tick(self) -> None:
        """Print the progress line if `interval` has passed since the last one."""
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        with self._lock:
            text = f"batchgen: {self._line(now)}"
            if self.live:
                pad = max(len(self._shown) - len(text), 0)
                self.stream.write("\r" + text + " " * pad)
                self._shown = text
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def line(self) -> str:
        with self._lock:
            return self._line(time.monotonic())

    def _line(self, now: float) -> str:
        elapsed = now - self.started
        state = self._rank_states()
        if not self.counts:
            return f"starting the ranks | {state} | elapsed {fmt_duration(elapsed)}"
        snaps = [c.snapshot for c in self.counts.values()]
        # A rank that ended without counts had nothing to do (already complete): its prompts
        # are done and part of the total.
        silent = [self.finished[r] for r in self.ended - set(self.counts) if r in self.finished]
        done = sum(s["done_before"] + s["prompts"] for s in snaps) + sum(silent)
        known = all(s["todo"] is not None for s in snaps) and (
            len(self.counts) + len(silent) == self.num_ranks
        )
        total = sum(s["done_before"] + s["todo"] for s in snaps) + sum(silent) if known else None
        # Rates of the ranks generating now (a final snapshot: that rank has stopped).
        active = [
            c for r, c in self.counts.items() if r in self.running and not c.snapshot["final"]
        ]
        prompt_rate = sum(c.rate("prompts") for c in active)
        eta = (total - done) / prompt_rate if total is not None and prompt_rate > 0 else None
        return progress_line(
            done,
            total,
            sum(c.rate("completion_tokens") for c in active),
            sum(s["errors"] for s in snaps),
            eta,
            elapsed,
            state,
        )

    def _rank_states(self) -> str:
        running, ended = len(self.running), len(self.ended)
        waiting = self.num_ranks - running - ended
        parts = [f"{running} of {self.num_ranks} ranks running"]
        if ended:
            parts.append(f"{ended} ended")
        if waiting:
            parts.append(f"{waiting} waiting")
        return ", ".join(parts)

    def totals(self) -> dict[str, Any]:
        """What the ranks did this run, summed; output tok/s over the span in which any rank
        was generating (engine starts left out, as in a one-process run's report)."""
        with self._lock:
            counts = list(self.counts.values())
        snaps = [c.snapshot for c in counts]
        span = max((c.gen_end for c in counts), default=0.0) - min(
            (c.gen_start for c in counts), default=0.0
        )
        tokens = sum(s["completion_tokens"] for s in snaps)
        return {
            "prompts": sum(s["prompts"] for s in snaps),
            "rows": sum(s["rows"] for s in snaps),
            "errors": sum(s["errors"] for s in snaps),
            "completion_tokens": tokens,
            "generate_seconds": span,
            "output_tokens_per_second": tokens / span if span > 0 else None,
        }

    def close(self) -> None:
        with self._lock:
            if self._shown:
                self.stream.write("\n")
                self.stream.flush()
                self._shown = ""


class NodeLogHandler(logging.Handler):
    """The launcher's own log lines, printed above the live progress line like the ranks'."""

    def __init__(self, progress: NodeProgress, formatter: logging.Formatter | None) -> None:
        super().__init__()
        self.progress = progress
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.log(self.format(record))
        except Exception:  # logging must never take the launcher down
            self.handleError(record)
