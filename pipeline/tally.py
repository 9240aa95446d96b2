"""What `batchgen plan` counts of the prompts a run would do, and of what --output holds:
error rows by kind, an exact histogram of prompt lengths, the stop behaviour of earlier runs.
Each is a fixed size whatever the input's (a length histogram has at most one entry per
length up to the context)."""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.positions import Positions
from pipeline.prompts import error_kind
from pipeline.records import PromptRow

PERCENTILES = (50, 90, 99)
EXAMPLES = 3  # example ids kept per error kind
WORST = 5  # over-long prompts kept, longest first


@dataclass(slots=True)
class ErrorKind:
    """Error rows of one kind: how many prompts, a few example ids and the first message."""

    prompts: int = 0
    examples: list[str] = field(default_factory=list)
    message: str = ""


class Tally:
    """Counts over built requests, in memory that does not grow with the input."""

    def __init__(self, max_model_len: int) -> None:
        self.max_model_len = max_model_len
        self.prompts = 0  # read and still to do
        self.rows = 0  # output rows they make: prompts x n
        self.error_prompts = 0
        self.error_rows = 0
        self.errors: dict[str, ErrorKind] = {}
        self.worst: list[tuple[int, str]] = []  # a min-heap of the longest over-long prompts
        self.lengths: Counter[int] = Counter()  # prompt tokens -> prompts (engine prompts only)
        self.prompt_tokens = 0
        self.samples = 0  # engine prompts x n
        self.ceiling = 0  # output tokens if every sample ran to its budget
        self.reused = 0  # prompts whose outputs --reuse finds in an earlier run

    def add(self, rows: list[PromptRow]) -> None:
        for row in rows:
            n = row.n
            self.prompts += 1
            self.rows += n
            if row.error is not None:
                self._error(row, n)
                continue
            if row.reused is not None:
                self.reused += 1
                continue
            tokens = len(row.token_ids or ())
            self.lengths[tokens] += 1
            self.prompt_tokens += tokens
            self.samples += n
            budget = row.max_tokens or row.sampling["max_tokens"]
            # The engine ends a sample at the context's end too ("length").
            self.ceiling += n * min(budget, self.max_model_len - tokens)

    def _error(self, row: PromptRow, n: int) -> None:
        assert row.error is not None
        self.error_prompts += 1
        self.error_rows += n
        kind = error_kind(row.error)
        tally = self.errors.setdefault(kind, ErrorKind(message=row.error))
        tally.prompts += 1
        if len(tally.examples) < EXAMPLES:
            tally.examples.append(row.id)
        if kind == "over-long" and row.token_ids is not None:
            item = (len(row.token_ids), row.id)
            if len(self.worst) < WORST:
                heapq.heappush(self.worst, item)
            else:
                heapq.heappushpop(self.worst, item)

    def merge(self, other: Tally) -> None:
        for name in ("prompts", "rows", "error_prompts", "error_rows", "prompt_tokens", "reused"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.samples += other.samples
        self.ceiling += other.ceiling
        self.lengths.update(other.lengths)
        for kind, theirs in other.errors.items():
            mine = self.errors.setdefault(kind, ErrorKind(message=theirs.message))
            mine.prompts += theirs.prompts
            mine.examples = (mine.examples + theirs.examples)[:EXAMPLES]
        for item in other.worst:
            heapq.heappush(self.worst, item)
            if len(self.worst) > WORST:
                heapq.heappop(self.worst)

    @property
    def engine_prompts(self) -> int:
        """Prompts the engine would get (the rest are error rows or reused)."""
        return self.prompts - self.error_prompts - self.reused

    def percentile(self, q: float) -> int | None:
        """The q-th percentile of prompt tokens (nearest rank, exact)."""
        total = sum(self.lengths.values())
        if not total:
            return None
        rank = max(1, -(-q * total // 100))  # ceil(q% of total)
        seen = 0
        for length in sorted(self.lengths):
            seen += self.lengths[length]
            if seen >= rank:
                return length
        return max(self.lengths)

    def token_stats(self) -> dict[str, Any]:
        engine = self.engine_prompts
        stats: dict[str, Any] = {"total": self.prompt_tokens, "prompts": engine}
        if engine:
            stats["mean"] = round(self.prompt_tokens / engine, 1)
            stats["min"] = min(self.lengths)
            stats.update({f"p{q}": self.percentile(q) for q in PERCENTILES})
            stats["max"] = max(self.lengths)
        return stats

    def worst_first(self) -> list[tuple[int, str]]:
        return sorted(self.worst, key=lambda item: (-item[0], item[1]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "rows": self.rows,
            "error_prompts": self.error_prompts,
            "error_rows": self.error_rows,
            "reused_prompts": self.reused,
            "generate_prompts": self.engine_prompts,
            "errors": {
                kind: {"prompts": e.prompts, "examples": e.examples, "message": e.message}
                for kind, e in sorted(self.errors.items(), key=lambda kv: (-kv[1].prompts, kv[0]))
            },
            "over_long_worst": [{"id": i, "tokens": t} for t, i in self.worst_first()],
            "prompt_tokens": self.token_stats(),
            "output_token_ceiling": self.ceiling,
            "samples": self.samples,
        }


@dataclass(slots=True)
class History:
    """What earlier runs of a rank recorded in --output: stop behaviour and the last run's rate."""

    samples: int = 0  # committed output rows that are not error rows
    completion_tokens: int = 0
    finish_reasons: Counter[str] = field(default_factory=Counter)
    last_prompts: int = 0  # engine prompts of the last run
    last_seconds: float = 0.0  # its generation time
    last_start_seconds: float = 0.0  # its engine start (the slowest rank's, merged)

    def merge(self, other: History) -> None:
        self.samples += other.samples
        self.completion_tokens += other.completion_tokens
        self.finish_reasons.update(other.finish_reasons)
        self.last_prompts += other.last_prompts
        self.last_seconds += other.last_seconds
        self.last_start_seconds = max(self.last_start_seconds, other.last_start_seconds)

    @property
    def rate(self) -> float | None:
        """Engine prompts per second of the last run(s), pooled."""
        if self.last_prompts <= 0 or self.last_seconds <= 0:
            return None
        return self.last_prompts / self.last_seconds


@dataclass(slots=True)
class RankPlan:
    """One rank: what its input holds, what --output already has, and what a run would do."""

    rank: int
    input_prompts: int | None  # rows of this rank's slice, when the source knows
    committed_prompts: int
    committed_rows: int
    committed_errors: int
    tally: Tally
    history: History | None
    refused: list[str]
    holder: str | None
    done: Positions = field(default_factory=Positions)  # while reading: the rows a run skips

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "input_prompts": self.input_prompts,
            "committed_prompts": self.committed_prompts,
            "committed_rows": self.committed_rows,
            "committed_error_rows": self.committed_errors,
            "todo": self.tally.to_dict(),
            "holder": self.holder,
            "refused": self.refused,
        }
