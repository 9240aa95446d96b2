"""`batchgen run --data-parallel N`: the ranks of one run on this node, one process per rank,
each pinned to its own GPUs (or CPU cores), behind one terminal.

Every rank is an ordinary `batchgen run ... --num-ranks M --rank I` process with the
same flags, so resume, `batchgen status` and the exactly-once guarantee are the rank machinery's
own; a rerun redoes only what a rank had not committed. This module starts, pins, watches,
signals and sums them:

  * GPUs: a rank gets `--tensor-parallel-size` of the visible GPUs as its CUDA_VISIBLE_DEVICES
    (a slice of an existing CUDA_VISIBLE_DEVICES). CPU: its own cores (process affinity and
    VLLM_CPU_OMP_THREADS_BIND) and an equal share of VLLM_CPU_KVCACHE_SPACE.
  * Ranks run in sessions of their own, so a terminal's Ctrl-C reaches the launcher alone, which
    passes every SIGTERM / SIGINT / SIGUSR1 on to each running rank once (a second one aborts
    their running requests, as it does for one process). A rank gets SIGTERM when the launcher
    dies (PR_SET_PDEATHSIG), so it commits and exits 75 instead of running on unwatched.
  * Per rank, one thread prefixes its output lines with `[rank I]`, and another reads the JSON
    progress snapshots it sends down a pipe (the hidden --progress-fd) for the one combined line.
  * When a rank ends, what it left behind in its session (vLLM's engine core, when the rank was
    killed) is stopped.
  * With more ranks than slots (`--num-ranks 8 --data-parallel 2`), a rank starts on the first
    slot that frees up: the way to finish a run on fewer GPUs than it started with.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import logging
import os
import signal
import site
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.checkpoint import Manifest, lock_holder, recorded_ranks, remove_run
from pipeline.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    BatchgenError,
    ConfigError,
    OutputLocked,
    ResumeMismatch,
)
from pipeline.progress import NodeLogHandler, NodeProgress, fmt_duration
from pipeline.report import log_output
from pipeline.sinks import prepare_output_dir
from pipeline.slots import NodePlan, Slot
from pipeline.status import read_status

log = logging.getLogger("batchgen")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# What a rank leaves in its session may exit by itself this long (multiprocessing's resource
# tracker cleans up after its parent); then it is killed.
LEFTOVER_SECONDS = 3.0
POLL_SECONDS = 0.1
LAST_LINES = 40  # of each rank's output, kept to name its last message when it fails
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def rank_command() -> list[str]:
    """The command that starts a rank: this Python running this batchgen. (`-P`: a `pipeline`
    folder in the current directory must not stand in for it; tests/hooks.py replaces this to
    start ranks with the test hooks installed.)"""
    return [sys.executable, "-P", "-m", "pipeline"]


def _python_path(env: Mapping[str, str]) -> str:
    """PYTHONPATH for a rank: this batchgen's folder first unless it is installed in
    site-packages, so the rank imports the very code the launcher runs."""
    root = str(Path(__file__).resolve().parent.parent)
    current = env.get("PYTHONPATH", "")
    installed = {
        str(Path(p).resolve()) for p in [*site.getsitepackages(), site.getusersitepackages()]
    }
    if root in installed:
        return current
    return os.pathsep.join([root, current]) if current else root


def _rank_setup(parent: int, cpus: tuple[int, ...] | None) -> Callable[[], None]:
    """What a rank's process does between fork and exec: die with the launcher (as a SIGTERM,
    which it handles by committing and exiting 75) and keep to its cores. Only a system call
    each, since the launcher has threads (subprocess's preexec_fn caveat)."""
    deathsig = int(signal.SIGTERM)

    def setup() -> None:
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, deathsig, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the prctl
            os._exit(EXIT_INTERRUPTED)
        if cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cpus)

    return setup


@dataclass(slots=True)
class _RankProcess:
    rank: int
    slot: Slot
    proc: subprocess.Popen
    lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LAST_LINES))
    output: threading.Thread | None = None
    code: int = 0  # its exit code, or -N for signal N, as settled by `settle`
    error: str | None = None  # the error its manifest records, if it recorded a failure

    def settle(self, manifest: Manifest | None) -> None:
        """Its outcome. Killed by a signal, a rank may still have recorded how its run ended: a
        stop signal that lands while a finished rank's interpreter shuts down (seconds, with
        torch loaded) kills it after its work is done, and the manifest tells that apart."""
        self.code = self.proc.returncode
        if self.code >= 0 or manifest is None:
            return
        if manifest.status == "finished":  # whichever process recorded it: the rank is done
            self.code = EXIT_OK
        elif manifest.pid == self.proc.pid and manifest.status in ("interrupted", "failed"):
            self.code = EXIT_INTERRUPTED if manifest.status == "interrupted" else 1
            self.error = manifest.report.get("error")

    def outcome(self, several: bool = False) -> str:
        if self.code == EXIT_OK:
            return "finished"
        if self.code == EXIT_INTERRUPTED:
            return "interrupted (exit 75)"
        if self.code < 0:
            return f"{'were' if several else 'was'} killed by {_signal_name(-self.code)}"
        return f"failed (exit {self.code})"

    @property
    def failed(self) -> bool:
        return self.code not in (EXIT_OK, EXIT_INTERRUPTED)

    def last_message(self) -> str:
        """Its error (what follows click's `Error: `), else its last line."""
        lines = list(self.lines)
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].startswith("Error: "):
                return "\n  ".join([lines[i].removeprefix("Error: "), *lines[i + 1 :]])
        if self.error:
            return self.error
        return lines[-1] if lines else "(no output)"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class NodeRun:
    """One `--data-parallel` run: starts the ranks on free slots, forwards stop signals, watches
    them end, and sums up. `run()` returns the exit code (0 or 75) or raises for failed ranks."""

    def __init__(
        self,
        flags: list[str],
        plan: NodePlan,
        out_dir: Path,
        overwrite: bool = False,
        progress_seconds: float | None = None,
    ) -> None:
        self.flags = flags  # the rank's `batchgen run` flags, less its rank and --overwrite
        self.plan = plan
        self.out_dir = out_dir
        self.overwrite = overwrite
        self.progress = NodeProgress(plan.num_ranks, interval=progress_seconds)
        self.signals: list[int] = []  # received, not yet passed on (the handler only appends)
        self.stop_signal: str | None = None
        self.running: dict[int, _RankProcess] = {}
        self.ended: dict[int, _RankProcess] = {}
        self.leftovers: list[tuple[int, int, float]] = []  # (rank, its session, kill after)
        self.started = time.monotonic()

    def run(self) -> int:
        self._check_output()
        n, slots = self.plan.num_ranks, len(self.plan.slots)
        log.info(
            "--data-parallel: %d rank%s of %s, %s",
            n,
            "s" if n > 1 else "",
            self.out_dir,
            f"{slots} at a time" if slots < n else "each in its own process",
        )
        pending = collections.deque(range(n))
        free = list(self.plan.slots)
        with self._log_above_progress(), self._catch_signals():
            while pending or self.running:
                self._pass_on_signals()
                while pending and free and self.stop_signal is None:
                    rank = pending.popleft()
                    self.running[rank] = self._start(rank, free.pop(0))
                for rank, child in list(self.running.items()):
                    if child.proc.poll() is not None:
                        del self.running[rank]
                        free.append(child.slot)
                        self._ended(child)
                self._stop_leftovers()
                self.progress.tick()
                if not self.running and self.stop_signal is not None:
                    break  # the ranks not started stay not started
                time.sleep(POLL_SECONDS)
            while self.leftovers:
                self._stop_leftovers()
                time.sleep(POLL_SECONDS)
            self.progress.close()
        return self._summary(not_started=list(pending))

    def _check_output(self) -> None:
        """Refusals before any rank starts: another rank layout in OUT (each rank would refuse
        it alike), or a rank of OUT written by a live process; --overwrite for all ranks at
        once (ranks doing it each for themselves would race to remove each other's files)."""
        n = self.plan.num_ranks
        prepare_output_dir(self.out_dir)  # one message for an unwritable OUT, not one per rank
        if self.overwrite:
            removed = remove_run(self.out_dir)
            if removed:
                log.warning("--overwrite removed %s", removed)
            return
        layouts = sorted(set(recorded_ranks(self.out_dir).values()) - {n})
        if layouts:
            old = layouts[0]
            slots = min(len(self.plan.slots), old)
            raise ResumeMismatch(
                f"{self.out_dir} holds a run of {old} rank(s), and this would be a run of {n}:\n"
                f"  num_shards: {old} -> {n}\n"
                f"rerun with --data-parallel {old} to resume it, or with --num-ranks {old} "
                f"--data-parallel {slots} to run its {old} ranks {slots} at a time on fewer "
                "GPUs; pass --overwrite to start afresh, or choose another --output"
            )
        for rank in range(n):
            holder = lock_holder(self.out_dir, rank)
            if holder is not None:
                raise OutputLocked(
                    f"rank {rank} of {self.out_dir} is being written by {holder}; wait for it "
                    "to finish or stop it (a killed process releases the lock at once), or "
                    "write to another --output"
                )

    def _start(self, rank: int, slot: Slot) -> _RankProcess:
        n = self.plan.num_ranks
        read_end, write_end = os.pipe()
        command = [
            *rank_command(),
            "run",
            *self.flags,
            *slot.flags,
            "--num-ranks",
            str(n),
            "--rank",
            str(rank),
            "--progress-fd",
            str(write_end),
        ]
        env = {
            **os.environ,
            **slot.env,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": _python_path(os.environ),
        }
        try:
            proc = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                pass_fds=(write_end,),
                start_new_session=True,
                preexec_fn=_rank_setup(os.getpid(), slot.cpus),
            )
        except OSError as exc:
            os.close(read_end)
            raise BatchgenError(
                f"starting rank {rank} of {n} failed: {exc}; the ranks already started go on "
                "until they see this launcher gone, then commit and stop; rerun the same "
                "command to resume"
            ) from exc
        finally:
            os.close(write_end)
        child = _RankProcess(rank, slot, proc)
        log.info("rank %d of %d: pid %d on %s", rank, n, proc.pid, slot.where)
        self.progress.rank_started(rank)
        child.output = self._thread(self._read_output, child)
        self._thread(self._read_progress, rank, read_end)
        return child

    @staticmethod
    def _thread(target: Callable, *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        return thread

    def _read_output(self, child: _RankProcess) -> None:
        assert child.proc.stdout is not None
        with child.proc.stdout:
            for raw in child.proc.stdout:
                # A progress bar redraws with \r; keep what it shows last.
                parts = [p for p in raw.rstrip("\n").split("\r") if p.strip()]
                if parts:
                    child.lines.append(parts[-1])
                    self.progress.log(f"[rank {child.rank}] {parts[-1]}")

    def _read_progress(self, rank: int, fd: int) -> None:
        with open(fd, encoding="utf-8", errors="replace") as channel:
            for line in channel:
                try:
                    snapshot = json.loads(line)
                except ValueError:
                    continue
                self.progress.update(rank, snapshot)

    def _ended(self, child: _RankProcess) -> None:
        if child.output is not None:
            child.output.join(timeout=2.0)  # its last lines first, then this one
        try:
            manifest = Manifest.load(self.out_dir, child.rank)
        except BatchgenError:
            manifest = None
        child.settle(manifest)
        self.ended[child.rank] = child
        if manifest is not None and manifest.status == "finished":
            self.progress.rank_ended(child.rank, manifest.prompts_committed)
        else:
            self.progress.rank_ended(child.rank)
        self.leftovers.append((child.rank, child.proc.pid, time.monotonic() + LEFTOVER_SECONDS))
        level = logging.WARNING if child.code != EXIT_OK else logging.INFO
        log.log(level, "rank %d of %d %s", child.rank, self.plan.num_ranks, child.outcome())

    def _stop_leftovers(self) -> None:
        """Kill what an ended rank left in its session once LEFTOVER_SECONDS have passed: a
        killed rank's vLLM engine core would otherwise run on, holding memory, forever."""
        now = time.monotonic()
        for item in list(self.leftovers):
            rank, session, deadline = item
            try:
                os.killpg(session, 0)
            except (ProcessLookupError, PermissionError):
                self.leftovers.remove(item)
                continue
            if now >= deadline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(session, signal.SIGKILL)
                log.warning("stopped the processes rank %d left behind (vLLM's engine)", rank)
                self.leftovers.remove(item)

    @contextlib.contextmanager
    def _catch_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)  # passed on by the main loop, never from inside a handler

    def _pass_on_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            name = _signal_name(signum)
            targets = sorted(self.running)
            for rank in targets:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.running[rank].proc.pid, signum)
            ranks = ", ".join(map(str, targets)) or "none running"
            if self.stop_signal is None:
                self.stop_signal = name
                log.warning(
                    "%s received: passed on to rank(s) %s, which finish their running requests, "
                    "commit and exit 75; ranks not started yet stay so; rerun the same command "
                    "to resume",
                    name,
                    ranks,
                )
            else:
                log.warning(
                    "%s received again: passed on to rank(s) %s, which abort their running "
                    "requests",
                    name,
                    ranks,
                )

    @contextlib.contextmanager
    def _log_above_progress(self) -> Iterator[None]:
        """The launcher's own log lines go above the live progress line, like the ranks'."""
        previous = log.handlers[:]
        formatter = previous[0].formatter if previous else None
        log.handlers[:] = [NodeLogHandler(self.progress, formatter)]
        try:
            yield
        finally:
            log.handlers[:] = previous

    def _summary(self, not_started: list[int]) -> int:
        n = self.plan.num_ranks
        children = [self.ended[r] for r in sorted(self.ended)]
        failed = [c for c in children if c.failed]
        interrupted = [c for c in children if c.code == EXIT_INTERRUPTED]
        status = "failed" if failed else "interrupted" if interrupted or not_started else "finished"
        totals = self.progress.totals()
        log.info(
            "%s: %d rank%s | %s prompts this run (%s rows, %s errors) | %s output tokens | "
            "generate %s, wall %s | %s output tok/s",
            status,
            n,
            "s" if n > 1 else "",
            f"{totals['prompts']:,}",
            f"{totals['rows']:,}",
            f"{totals['errors']:,}",
            f"{totals['completion_tokens']:,}",
            fmt_duration(totals["generate_seconds"]),
            fmt_duration(time.monotonic() - self.started),
            f"{totals['output_tokens_per_second'] or 0:,.1f}",
        )
        with contextlib.suppress(BatchgenError):
            log_output(read_status(self.out_dir).to_dict()["all"], self.out_dir, n)
        if failed:
            raise self._failure(failed, interrupted, not_started)
        return EXIT_INTERRUPTED if status == "interrupted" else EXIT_OK

    def _failure(
        self,
        failed: list[_RankProcess],
        interrupted: list[_RankProcess],
        not_started: list[int],
    ) -> BatchgenError:
        """Every failed rank with its exit status and last message, and what the rerun does."""
        n = self.plan.num_ranks
        alike: dict[tuple[str, str], list[_RankProcess]] = {}  # ranks that failed the same way
        for c in failed:
            alike.setdefault((c.outcome(), c.last_message()), []).append(c)
        lines = []
        for (_, message), group in alike.items():
            who = ", ".join(str(c.rank) for c in group)
            several = len(group) > 1
            lines.append(
                f"rank{'s' if several else ''} {who} of {n} {group[0].outcome(several)}: {message}"
            )
        others = []
        finished = [c.rank for c in self.ended.values() if c.code == EXIT_OK]
        for what, ranks in (
            ("finished", finished),
            ("were interrupted", [c.rank for c in interrupted]),
            ("did not start", not_started),
        ):
            if ranks:
                others.append(f"rank(s) {', '.join(map(str, sorted(ranks)))} {what}")
        done = "; ".join(others) + "; " if others else ""
        if all(c.code == 2 for c in failed):  # a refused flag or input: exit 2, as for one process
            return ConfigError("\n".join([*lines, done + "fix what they name, then rerun"]))
        redo = ", ".join(str(c.rank) for c in failed)
        lines.append(
            done + "rerun the same command to resume: finished ranks do nothing, and "
            f"rank(s) {redo} redo only what they had not committed"
            + (" once the cause is fixed" if any(c.code > 0 for c in failed) else "")
        )
        message = "\n".join(lines)
        return BatchgenError(message)
