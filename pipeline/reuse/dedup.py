"""One generation per distinct request within a run.

Between the feeder and the engine (on the engine's thread): a row whose request key is already
in the engine waits for that request instead of being sent again, and gets a copy of its
results; a row whose request finished a moment ago gets a copy at once. Rows reused from an
earlier run (--reuse) skip the engine entirely, and so do rows whose request this run
committed before it was resumed (counted as duplicates: see pipeline.reuse.lookup). Sampled rows carry their own seed in the key,
so sampled rows with different seeds are never merged.

Memory is bounded: rows waiting for a request in flight (at most MAX_WAITING; past it a
duplicate is simply generated again) and the results of the last RECENT finished requests.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from pipeline.records import PromptRow, ResultRow
from pipeline.reuse.lookup import EarlierAttempt

MAX_WAITING = 4096
RECENT = 1024


class RequestDedup:
    """Wraps the engine's feed; `deliver` receives results that need no engine."""

    def __init__(self, deliver: Callable[[list[ResultRow]], None]) -> None:
        self.deliver = deliver
        self.in_flight: dict[bytes, list[PromptRow]] = {}  # key -> rows waiting for it
        self.waiting = 0
        self.recent: OrderedDict[bytes, list[ResultRow]] = OrderedDict()
        self.reused = 0  # prompts reused from an earlier run
        self.duplicates = 0  # prompts answered by another row's identical request

    def feed(self, rows: Iterable[PromptRow | None]) -> Iterator[PromptRow | None]:
        """The rows that need the engine (and None whenever nothing is ready)."""
        for row in rows:
            if row is None:
                yield None
                continue
            if row.reused is not None:
                if isinstance(row.reused, EarlierAttempt):
                    self.duplicates += 1
                else:
                    self.reused += 1
                self.deliver(row.reused)
                continue
            key = row.request_key
            if key is None:
                yield row
                continue
            done = self.recent.get(key)
            if done is not None:
                self.duplicates += 1
                self.deliver(_copies(done, row))
                continue
            waiting = self.in_flight.get(key)
            if waiting is not None and self.waiting < MAX_WAITING:
                waiting.append(row)
                self.waiting += 1
                self.duplicates += 1
                continue
            if waiting is None:
                self.in_flight[key] = []
            yield row

    def expand(self, results: list[ResultRow]) -> list[ResultRow]:
        """The engine's results plus a copy for every row that waited for one of them."""
        out = list(results)
        start = 0
        for i in range(1, len(results) + 1):  # a prompt's samples arrive together
            if i < len(results) and results[i].id == results[start].id:
                continue
            samples = results[start:i]
            start = i
            key = samples[0].request_key
            if key is None:
                continue
            waiting = self.in_flight.pop(key, [])
            self.waiting -= len(waiting)
            for row in waiting:
                out.extend(_copies(samples, row))
            if samples[0].error is None:
                self.recent[key] = samples
                if len(self.recent) > RECENT:
                    self.recent.popitem(last=False)
        return out


def _copies(samples: list[ResultRow], row: PromptRow) -> list[ResultRow]:
    """`samples` as the results of `row` (its id, order, prompt and passthrough columns)."""
    prompt = row.prompt_text if row.prompt_text is not None else row.prompt
    return [
        dataclasses.replace(s, id=row.id, seq=row.seq, prompt=prompt, passthrough=row.passthrough)
        for s in samples
    ]
