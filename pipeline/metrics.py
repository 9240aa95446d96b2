"""Prometheus metrics of one rank in node_exporter's textfile-collector format.

`--metrics-textfile DIR` makes each rank write DIR/batchgen_rank_00003.prom (a temporary name,
then a rename, so the collector never reads half a file) every METRICS_SECONDS and at the end
of its run; node_exporter --collector.textfile.directory=DIR serves every rank's file.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

METRICS_SECONDS = 10.0

# name: (type, help); every sample carries the labels rank and output.
METRICS = {
    "batchgen_rows_total": ("counter", "Output rows generated in this run."),
    "batchgen_prompts_total": ("counter", "Prompts done, earlier runs of this rank included."),
    "batchgen_prompt_tokens_total": ("counter", "Prompt tokens of prompts done in this run."),
    "batchgen_prompt_tokens_cached_total": (
        "counter",
        "Of those, tokens the engine's prefix cache served instead of computing.",
    ),
    "batchgen_completion_tokens_total": ("counter", "Output tokens generated in this run."),
    "batchgen_error_rows_total": ("counter", "Error rows in this run."),
    "batchgen_engine_restarts_total": ("counter", "Engine deaths restarted in this run."),
    "batchgen_requests_in_flight": ("gauge", "Prompts handed to the engine, not yet back."),
    "batchgen_rows_per_second": ("gauge", "Output rows per second since this run began."),
    "batchgen_prompts_todo": ("gauge", "Prompts this rank has still to do, when known."),
    "batchgen_last_update_timestamp_seconds": ("gauge", "When this file was written."),
}


def metrics_path(folder: Path, rank: int) -> Path:
    """A rank's file in the textfile collector's folder (one file a rank: no shared file)."""
    return folder / f"batchgen_rank_{rank:05d}.prom"


def render(values: dict[str, float | None], labels: dict[str, str]) -> str:
    """The text exposition format of `values` (None: the sample is left out)."""
    label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    lines = []
    for name, (kind, text) in METRICS.items():
        value = values.get(name)
        if value is None:
            continue
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines.append(f"{name}{{{label_text}}} {float(value)!r}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class MetricsFile:
    """Writes one rank's metrics file, at most every METRICS_SECONDS (always when final)."""

    def __init__(self, folder: str | Path, rank: int, output: str) -> None:
        self.path = metrics_path(Path(folder), rank)
        self.labels = {"rank": str(rank), "output": output}
        self._last = 0.0

    def write(self, values: dict[str, Any], now: float, final: bool = False) -> None:
        """Replace the file with `values` (a temporary file, then a rename), unless one was
        written less than METRICS_SECONDS ago; `now` is a monotonic time."""
        if not final and now - self._last < METRICS_SECONDS:
            return
        self._last = now
        values = {**values, "batchgen_last_update_timestamp_seconds": round(time.time(), 3)}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        # Metrics are information: a full disk or a missing folder must not stop the run.
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(render(values, self.labels))
            os.replace(tmp, self.path)
