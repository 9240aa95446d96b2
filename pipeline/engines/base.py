"""What every engine shares: the stop flags, the Engine interface the runner uses, and the
continuous-admission loop of the engines that step a scheduler in this process.

Engines take PromptRows (each carrying its token ids and its own sampling) and give back
ResultRows; whatever type an engine library uses stays inside that engine's module.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.errors import BatchgenError
from pipeline.records import PromptRow, ResultRow, error_results

log = logging.getLogger("batchgen")

# Rows that kill the engine each time, left out of one run as error rows before it concludes
# that the engine itself is broken and stops (a rerun continues).
MAX_POISON_ROWS = 2


class StopFlags:
    """How the runner asks an engine to stop: `stop` ends admission and lets running requests
    finish; `abort` drops whatever is still running."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.abort = threading.Event()
        self.signal_name: str | None = None  # the signal that asked for the stop, if any
        # Why an engine stopped the run itself, like a signal would (the server is gone).
        self.reason: str | None = None

    @property
    def interrupted(self) -> bool:
        """A stop that ends the run as interrupted (exit 75): a signal, or an engine's reason."""
        return self.signal_name is not None or self.reason is not None


class RejectedPrompt(Exception):
    """The engine refused one prompt; it becomes an error row."""


class EngineDied(Exception):
    """The engine's process died, raised on a step or stalled; `cause` says how, as far as it
    can be known. Requests in flight are lost; finished ones were already yielded."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class EngineGaveUp(BatchgenError):
    """The engine died more often than --engine-restarts allows; the run stops (committing
    what finished) and a rerun resumes."""


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    """How a run copes with engine deaths and stalls (flags --engine-restarts, --stall-seconds).

    `restarts`: engine deaths survived by starting a new engine; past them the run stops.
    Deaths while a suspected poison row is being isolated (in flight alone or in a shrinking
    group) do not count: they are bounded by the halving. `stall_seconds`: a step that
    produces nothing for this long is treated as a death.
    """

    restarts: int = 2
    stall_seconds: float = 600.0


# The shape of every engine's `generate`: prompt rows in (None: nothing ready yet), each
# finished row's results out, as they finish.
Rows = Iterable[PromptRow | None]
Faults = FaultPolicy | None
Results = Iterator[list[ResultRow]]


class Engine(Protocol):
    """What the runner needs from an engine."""

    max_model_len: int
    start_seconds: float

    def describe(self) -> dict[str, Any]:
        """Settings and versions recorded in the run's metadata and report."""
        ...

    def generate(
        self, rows: Rows, flags: StopFlags, max_inflight: int | None = None, faults: Faults = None
    ) -> Results:
        """Results for `rows` (None: nothing ready yet) as they finish, in any order."""
        ...

    failures: list[dict[str, Any]]  # the engine deaths survived or not, for the run's report

    def close(self) -> None:
        """Release the engine's processes and memory."""
        ...

    def check_sampling(self, sampling: dict[str, Any]) -> str | None:
        """Why the engine would refuse every request with this sampling record, or None."""
        ...

    # What `batchgen tune` needs besides a run's calls.

    def tunables(self) -> dict[str, Any]:
        """The effective values of the settings `batchgen tune` searches (engine defaults
        resolved), plus `device` and `max_model_len`."""
        ...

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt prefixes, so a second pass over the same prompts prefills anew."""
        ...

    def kv_cache_tokens(self) -> int | None:
        """Tokens the engine's KV cache holds, as the engine sized it at its start (None where
        not known): with `max_model_len`, how many sequences fit at once (the bench reports it)."""
        ...


class SteppingEngine(ABC):
    """An engine driven by add / step / abort calls from this thread (vLLM, the fake).

    `generate` keeps up to `max_inflight` requests inside the engine and yields each step's
    finished results at once: there is no batch boundary at which the engine drains. When the
    engine dies (`EngineDied`), it restarts it and sends the lost requests again, in halving
    groups run alone until a row that kills the engine on its own is found: that row, and only
    it, becomes an error row.
    """

    max_model_len: int
    max_num_seqs: int  # requests the engine runs at once; the rest wait in its queue
    start_seconds: float
    failures: list[dict[str, Any]]

    @abstractmethod
    def _add(self, row: PromptRow) -> str:
        """Queue one request; its id. Raises RejectedPrompt for a row the engine refuses, and
        EngineDied if the engine is dead."""

    @abstractmethod
    def _step(self) -> list[tuple[str, Any]]:
        """Run one engine step; the (request id, output) of every request it finished. Raises
        EngineDied if the engine died or stalled."""

    @abstractmethod
    def _abort(self, request_ids: list[str]) -> None:
        """Drop these requests."""

    @abstractmethod
    def _results(self, row: PromptRow, output: Any) -> list[ResultRow]:
        """A finished request's output as one ResultRow per sample."""

    @abstractmethod
    def _restart(self) -> None:
        """Replace a dead engine with a new one of the same settings."""

    def default_inflight(self) -> int:
        return 4 * self.max_num_seqs

    def check_sampling(self, sampling: dict[str, Any]) -> str | None:
        return None

    def generate(
        self, rows: Rows, flags: StopFlags, max_inflight: int | None = None, faults: Faults = None
    ) -> Results:
        """Continuous admission, surviving engine deaths as `faults` allows.

        On `flags.stop`, admission ends, requests still queued beyond the `max_num_seqs` that
        run at once are dropped (they are redone on resume), and the running ones may finish.
        On `flags.abort`, everything still in the engine is dropped.
        """
        run = _Admission(self, flags, max_inflight or self.default_inflight(), faults)
        yield from run.loop(iter(rows))


@dataclass(slots=True)
class _Admission:
    """The state of one `SteppingEngine.generate` call."""

    engine: SteppingEngine
    flags: StopFlags
    limit: int
    faults: FaultPolicy | None
    pending: dict[str, PromptRow] = field(default_factory=dict)
    # Rows that were in flight at an engine death, in groups to run alone, smallest first.
    quarantine: deque[list[PromptRow]] = field(default_factory=deque)
    isolating: list[PromptRow] | None = None  # the quarantine group now in the engine
    # Rows taken from the feed or a group that never reached the engine (it was dead when they
    # were added): sent again before the feed's next row, under no suspicion.
    unsent: deque[PromptRow] = field(default_factory=deque)
    strikes: dict[str, int] = field(default_factory=dict)  # deaths each row was in flight at
    counted_deaths: int = 0
    all_deaths: int = 0
    poisoned: int = 0  # rows left out as killers of the engine

    def loop(self, feed: Iterator[PromptRow | None]) -> Iterator[list[ResultRow]]:
        flags = self.flags
        exhausted = trimmed = False
        while True:
            if flags.stop.is_set() and not trimmed:
                # Requests are scheduled first come, first served: the oldest `max_num_seqs`
                # are the ones generating now. Drop the queued rest at once; only those drain.
                trimmed = True
                self.quarantine.clear()  # never admitted again this run: redone on resume
                self.unsent.clear()
                queued = list(self.pending)[self.engine.max_num_seqs :]
                if queued:
                    self.engine._abort(queued)
                    for request_id in queued:
                        del self.pending[request_id]
            try:
                idle = self.isolating is None and not self.pending
                if idle and self.quarantine and not flags.stop.is_set():
                    self.isolating = self.quarantine.popleft()
                    yield from self._admit(self.isolating)
                while (
                    self.isolating is None
                    and not self.quarantine
                    and (self.unsent or not exhausted)
                    and not flags.stop.is_set()
                    and len(self.pending) < self.limit
                ):
                    if self.unsent:
                        yield from self._admit([self.unsent.popleft()])
                        continue
                    try:
                        row = next(feed)
                    except StopIteration:
                        exhausted = True
                        break
                    if row is None:
                        if self.pending:
                            break  # nothing ready; step the engine instead of waiting
                        continue
                    yield from self._admit([row])
                if not self.pending:
                    self.isolating = None
                    if self.quarantine and not flags.stop.is_set():
                        continue
                    if (exhausted and not self.unsent) or flags.stop.is_set():
                        return
                    continue
                if flags.abort.is_set():
                    self.engine._abort(list(self.pending))
                    log.warning(
                        "aborted %d unfinished requests; they will run again on resume",
                        len(self.pending),
                    )
                    return
                finished: list[ResultRow] = []
                for request_id, output in self.engine._step():
                    row = self.pending.pop(request_id, None)
                    if row is not None:
                        finished.extend(self.engine._results(row, output))
                if finished:
                    yield finished
            except EngineDied as death:
                yield from self._survive(death)

    def _admit(self, rows: list[PromptRow]) -> Iterator[list[ResultRow]]:
        for i, row in enumerate(rows):
            if row.error is not None:
                yield error_results(row, row.error)
                continue
            try:
                self.pending[self.engine._add(row)] = row
            except RejectedPrompt as exc:
                yield error_results(row, str(exc))
            except EngineDied:
                # The engine was dead before this row reached it: neither in flight nor done,
                # it and the rest of `rows` are sent again after the restart.
                self.unsent.extendleft(reversed(rows[i:]))
                raise

    def _survive(self, death: EngineDied) -> Iterator[list[ResultRow]]:
        """Record a death, isolate the rows it may be due to, restart or give up."""
        if self.flags.stop.is_set():
            self._died_stopping(death)
            return
        lost = [*self.pending.values(), *(r for group in self.quarantine for r in group)]
        lost += self.unsent
        lost_now = list(self.pending.values())
        alone = self.isolating is not None
        self.pending.clear()
        self.all_deaths += 1
        for row in lost_now:
            self.strikes[row.id] = self.strikes.get(row.id, 0) + 1
        record = {
            "at": round(time.time(), 3),
            "cause": death.cause,
            "in_flight": len(lost_now),
            "isolating": alone,
        }
        self.engine.failures.append(record)
        policy = self.faults or FaultPolicy()
        if not alone:
            self.counted_deaths += 1
        killer = alone and len(lost_now) == 1 and self.strikes[lost_now[0].id] >= 2
        self._give_up_if_broken(death, record, policy, killer, len(lost))
        if killer:
            row = lost_now[0]
            self.poisoned += 1
            log.warning(
                "row %s was in flight at %d engine deaths, the last alone; it becomes an error "
                "row so that the others can run",
                row.id,
                self.strikes[row.id],
            )
            yield error_results(
                row,
                f"the engine died each time this row was in it ({death.cause}); left out so "
                "the other rows could run",
            )
        elif len(lost_now) == 1:
            self.quarantine.appendleft(lost_now)  # once more, alone
        elif lost_now:
            half = len(lost_now) // 2
            self.quarantine.extendleft([lost_now[half:], lost_now[:half]])
        self.isolating = None
        log.warning(
            "the engine died (%s) with %d request(s) in flight; restarting it (%d of "
            "--engine-restarts %d used) and running them again%s",
            death.cause,
            len(lost_now),
            self.counted_deaths,
            policy.restarts,
            " in smaller groups to find a row that kills it" if lost_now else "",
        )
        started = time.monotonic()
        self.engine._restart()
        record["restarted"] = True
        record["restart_seconds"] = round(time.monotonic() - started, 1)

    def _died_stopping(self, death: EngineDied) -> None:
        """A death while stopping anyway (a signal, often the same one that hit the engine): no
        restart; what was in flight runs again on resume."""
        log.warning(
            "the engine died while stopping (%s); %d request(s) in flight run again on resume",
            death.cause,
            len(self.pending),
        )
        self.engine.failures.append(
            {"at": round(time.time(), 3), "cause": death.cause, "in_flight": len(self.pending),
             "isolating": False, "restarted": False}
        )  # fmt: skip
        self.pending.clear()
        self.quarantine.clear()
        self.unsent.clear()
        self.isolating = None

    def _give_up_if_broken(
        self,
        death: EngineDied,
        record: dict[str, Any],
        policy: FaultPolicy,
        killer: bool,
        lost: int,
    ) -> None:
        """EngineGaveUp when the deaths say the engine itself is failing, not a row."""
        # Halving groups end in a row alone within log2(in flight) deaths per suspect; past
        # that bound (or the budget), the engine itself is failing, not a row.
        bound = policy.restarts + 2 * math.ceil(math.log2(self.limit + 1)) + 4
        if killer and self.poisoned >= MAX_POISON_ROWS:
            record["restarted"] = False
            raise EngineGaveUp(
                f"the engine died ({death.cause}) with {self.poisoned + 1} different rows run "
                "alone this run: the engine, not those rows, looks broken; the rows it died on "
                "are error rows, the rest run again on resume"
            ) from death
        if policy.restarts == 0 or self.counted_deaths > policy.restarts or self.all_deaths > bound:
            record["restarted"] = False
            raise EngineGaveUp(
                f"the engine died ({death.cause}) {self.all_deaths} time(s) this run, more than "
                f"--engine-restarts {policy.restarts} allows; {lost} request(s) in flight "
                "were not committed and run again on resume"
            ) from death
