"""What every engine shares: the stop flags, the Engine interface the runner uses, and the
continuous-admission loop of the engines that step a scheduler in this process.

Engines take PromptRows (each carrying its token ids and its own sampling) and give back
ResultRows; whatever type an engine library uses stays inside that engine's module.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from pipeline.records import PromptRow, ResultRow, error_results

log = logging.getLogger("batchgen")


class StopFlags:
    """How the runner asks an engine to stop: `stop` ends admission and lets running requests
    finish; `abort` drops whatever is still running."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.abort = threading.Event()
        self.signal_name: str | None = None  # the signal that asked for the stop, if any


class RejectedPrompt(Exception):
    """The engine refused one prompt; it becomes an error row."""


class Engine(Protocol):
    """What the runner needs from an engine."""

    max_model_len: int
    start_seconds: float

    def describe(self) -> dict[str, Any]:
        """Settings and versions recorded in the run's metadata and report."""
        ...

    def generate(
        self, rows: Iterable[PromptRow | None], flags: StopFlags, max_inflight: int | None = None
    ) -> Iterator[list[ResultRow]]:
        """Results for `rows` (None: nothing ready yet) as they finish, in any order."""
        ...

    def close(self) -> None:
        """Release the engine's processes and memory."""
        ...

    def check_sampling(self, sampling: dict[str, Any]) -> str | None:
        """Why the engine would refuse every request with this sampling record, or None."""
        ...


class SteppingEngine(ABC):
    """An engine driven by add / step / abort calls from this thread (vLLM, the fake).

    `generate` keeps up to `max_inflight` requests inside the engine and yields each step's
    finished results at once: there is no batch boundary at which the engine drains.
    """

    max_model_len: int
    max_num_seqs: int  # requests the engine runs at once; the rest wait in its queue
    start_seconds: float

    @abstractmethod
    def _add(self, row: PromptRow) -> str:
        """Queue one request; its id. Raises RejectedPrompt for a row the engine refuses."""

    @abstractmethod
    def _step(self) -> list[tuple[str, Any]]:
        """Run one engine step; the (request id, output) of every request it finished."""

    @abstractmethod
    def _abort(self, request_ids: list[str]) -> None:
        """Drop these requests."""

    @abstractmethod
    def _results(self, row: PromptRow, output: Any) -> list[ResultRow]:
        """A finished request's output as one ResultRow per sample."""

    def default_inflight(self) -> int:
        return 4 * self.max_num_seqs

    def check_sampling(self, sampling: dict[str, Any]) -> str | None:
        return None

    def generate(
        self, rows: Iterable[PromptRow | None], flags: StopFlags, max_inflight: int | None = None
    ) -> Iterator[list[ResultRow]]:
        """Continuous admission.

        On `flags.stop`, admission ends, requests still queued beyond the `max_num_seqs` that
        run at once are dropped (they are redone on resume), and the running ones may finish.
        On `flags.abort`, everything still in the engine is dropped.
        """
        limit = max_inflight or self.default_inflight()
        pending: dict[str, PromptRow] = {}
        feed = iter(rows)
        exhausted = trimmed = False
        while True:
            if flags.stop.is_set() and not trimmed:
                # Requests are scheduled first come, first served: the oldest `max_num_seqs`
                # are the ones generating now. Drop the queued rest at once; only those drain.
                trimmed = True
                queued = list(pending)[self.max_num_seqs :]
                if queued:
                    self._abort(queued)
                    for request_id in queued:
                        del pending[request_id]
            while not exhausted and not flags.stop.is_set() and len(pending) < limit:
                try:
                    row = next(feed)
                except StopIteration:
                    exhausted = True
                    break
                if row is None:
                    if pending:
                        break  # nothing ready; step the engine instead of waiting
                    continue
                if row.error is not None:
                    yield error_results(row, row.error)
                    continue
                try:
                    pending[self._add(row)] = row
                except RejectedPrompt as exc:
                    yield error_results(row, str(exc))
            if not pending:
                if exhausted or flags.stop.is_set():
                    return
                continue
            if flags.abort.is_set():
                self._abort(list(pending))
                log.warning(
                    "aborted %d unfinished requests; they will run again on resume", len(pending)
                )
                return
            finished: list[ResultRow] = []
            for request_id, output in self._step():
                row = pending.pop(request_id, None)
                if row is not None:
                    finished.extend(self._results(row, output))
            if finished:
                yield finished
