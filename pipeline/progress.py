"""What the user sees while a run goes: a live line on a terminal, a plain line now and then in
a log (cron, Slurm), and a summary at the end. Everything goes to stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from pipeline.records import ResultRow


def fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Counts prompts and tokens as results arrive and prints at most every `interval` seconds."""

    def __init__(
        self,
        todo: int | None,
        done_before: int,
        stream: TextIO | None = None,
        interval: float | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.interval = interval if interval is not None else (0.5 if self.live else 30.0)
        self.todo = todo  # prompts this run must still do, when known
        self.done_before = done_before
        self.prompts = self.rows = self.errors = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reasons: dict[str, int] = {}
        self.started = time.monotonic()
        self._last = 0.0
        self._width = 0

    def add(self, results: list[ResultRow]) -> None:
        for r in results:
            self.rows += 1
            if r.sample_index == 0:
                self.prompts += 1
                if r.error is None:
                    self.prompt_tokens += r.prompt_tokens or 0
            if r.error is not None:
                self.errors += 1
                reason = "error"
            else:
                self.completion_tokens += r.completion_tokens or 0
                reason = r.finish_reason or "unknown"
            self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._print(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        done = self.done_before + self.prompts
        parts = []
        if self.todo is not None:
            total = self.done_before + self.todo
            pct = 100.0 * done / total if total else 100.0
            parts.append(f"{done:,}/{total:,} prompts ({pct:.1f}%)")
        else:
            parts.append(f"{done:,} prompts")
        parts.append(f"{self.completion_tokens / elapsed:,.0f} out tok/s")
        if self.errors:
            parts.append(f"{self.errors:,} errors")
        if self.todo and self.prompts:
            remaining = (self.todo - self.prompts) * elapsed / self.prompts
            parts.append(f"ETA {fmt_duration(max(remaining, 0))}")
        parts.append(f"elapsed {fmt_duration(elapsed)}")
        return " | ".join(parts)

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
        if self.live and self._width:
            self.stream.write("\n")
            self.stream.flush()
