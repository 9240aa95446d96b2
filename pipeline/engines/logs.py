"""The in-process engine's own output: diverted to a log file beside the run's state (vLLM's
start-up chatter and its processes' warnings), and read back for the one line that says why an
engine did not start."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# An exception line of vLLM's output ("RuntimeError: pin_memory=True requires ..."), optionally
# after its process prefix and log header.
_ERROR_LINE = re.compile(r"(?:^|\] |\s)((?:[A-Za-z_][\w.]*)?(?:Error|Exception): \S.*)$")
# Lines that only point at another: the cause is the line they point at.
_POINTERS = ("See root cause above", "See stack trace for root cause", "initialization failed")
LOG_READ_BYTES = 1 << 20


def start_failure(exc: BaseException, log_path: Path | None, log_start: int = 0) -> str:
    """What to tell the user when vLLM's engine did not start: its exception, the cause its
    engine core logged (vLLM's own exception only says "see root cause above", which went to
    the engine log from `log_start` on), where that log is, and what to check."""
    cause = root_cause(log_path, log_start) if log_path is not None else None
    said = describe_exception(exc)
    text = f"vLLM's engine failed to start: {said}"
    if cause and cause not in said:
        text += f"; the cause, from its log: {cause}"
    where = f"; vLLM's own log: {log_path}" if log_path is not None else "; vLLM's output above"
    return (
        f"{text}{where}; check the engine flags it names (--engine-arg, --max-model-len, "
        "--max-num-seqs, memory settings) or the model"
    )


def root_cause(log_path: Path, start: int = 0) -> str | None:
    """The first exception line that an engine log got from byte `start` on (this start's
    output; the log is appended to across resumes) that is not a pointer to another."""
    try:
        with log_path.open("rb") as f:
            f.seek(max(start, log_path.stat().st_size - LOG_READ_BYTES))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    for line in tail.splitlines():
        match = _ERROR_LINE.search(line.strip())
        if match and not any(p in match.group(1) for p in _POINTERS):
            return match.group(1)
    return None


def log_size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def describe_exception(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class EngineLog:
    """The engine log file of this process (one at a time; a restarted engine appends to the
    same one), and the diversion of vLLM's own logger into it. vLLM's handler keeps writing to
    whatever stream it was set up with; a filter on it writes each record to the engine log
    instead and drops it there, so nothing is re-pointed (a test runner's captured streams
    stay as they are) and `batchgen run -v` (no engine log) passes everything through."""

    path: Path | None = None
    sink: Any = None

    @classmethod
    def open(cls, path: Path | None) -> Any:
        if path != cls.path:
            cls.close()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                cls.sink = open(path, "a", buffering=1)  # noqa: SIM115
            cls.path = path
        cls.divert()
        return cls.sink

    @classmethod
    def close(cls) -> None:
        if cls.sink is not None:
            cls.sink.close()
        cls.path = cls.sink = None

    @classmethod
    def divert(cls) -> None:
        """Put the filter on vLLM's handlers; vLLM sets them up at import and again when an
        engine starts, so this runs after both."""
        for handler in logging.getLogger("vllm").handlers:
            if not any(isinstance(f, _ToEngineLog) for f in handler.filters):
                handler.addFilter(_ToEngineLog(handler))


class _ToEngineLog(logging.Filter):
    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        sink = EngineLog.sink
        if sink is None or sink.closed:
            return True
        with contextlib.suppress(Exception):  # a log line must never fail the run
            sink.write(self.handler.format(record) + "\n")
        return False


atexit.register(EngineLog.close)


@contextlib.contextmanager
def engine_output(path: Path | None) -> Iterator[None]:
    """Send what vLLM prints while it imports and starts to `path` (appended): its processes
    inherit the file as their stdout and stderr for their whole life, and its logger in this
    process writes there from then on (see EngineLog). Without `path` (batchgen run -v),
    nothing changes."""
    sink = EngineLog.open(path)
    if sink is None:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(sink.fileno(), 1)
    os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, copy_of in zip((1, 2), saved, strict=True):
            os.dup2(copy_of, fd)
            os.close(copy_of)
        EngineLog.divert()
