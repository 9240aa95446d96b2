"""Where a pass's time goes, cheaply: the GPU's busy share (nvidia-smi sampling) and the CPU
time of each side's processes (the front end that feeds and reads the engine, and vLLM's engine
core beneath it), read from /proc. Enough to tell a host-bound small model (GPU mostly idle,
engine core near one full core) from a GPU-bound one."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import threading
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
SAMPLE_MS = 100


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds), for every process readable in /proc."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            rest = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(entry.name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / TICK)
    return table


def tree_cpu_seconds(root: int) -> tuple[float, float]:
    """CPU seconds used so far by `root` itself and by all its descendants together."""
    table = _proc_table()
    own = table.get(root, (0, 0.0))[1]
    below = 0.0
    for pid, (_, seconds) in table.items():
        p = pid
        while p > 1 and p != root:
            p = table.get(p, (0, 0.0))[0]
        if p == root and pid != root:
            below += seconds
    return own, below


class GpuBusy:
    """Samples nvidia-smi's utilization.gpu (the share of time a kernel ran) every 100 ms
    while running; `stop()` gives the mean in [0, 1], or None without nvidia-smi."""

    def __init__(self, gpu: str = "0") -> None:
        self.gpu = gpu  # as nvidia-smi -i takes it: an index or a UUID
        self.samples: list[float] = []
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> GpuBusy:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return self
        try:
            self.proc = subprocess.Popen(
                [
                    smi,
                    f"--id={self.gpu}",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    f"-lms={SAMPLE_MS}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:
            return self
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]) / 100)
            except ValueError:
                continue

    def stop(self) -> float | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.thread is not None:
            self.thread.join(timeout=5)
        return round(statistics.fmean(self.samples), 3) if self.samples else None
