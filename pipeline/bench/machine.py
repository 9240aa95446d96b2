"""What a figure was measured on, what else used the machine meanwhile, and where output goes."""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import __version__

OTHER_CPU_WARN = 0.05  # other processes' CPU share above which the figures are flagged


class OtherCpuMeter:
    """CPU time used by processes outside this one and its descendants (vLLM's engine
    processes), as a share of the machine's capacity since the meter started. Linux only."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.cpus = os.cpu_count() or 1
        self.start = self._sample()

    def share(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        busy = end[1] - self.start[1]
        ours = end[2] - self.start[2]
        if wall <= 0:
            return None
        return round(max(busy - ours, 0.0) / (wall * self.cpus), 3)

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            # user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
            values = [int(v) for v in fields[:8]]
            busy = (sum(values) - values[3] - values[4]) / self.tick
            return time.monotonic(), busy, self._tree_seconds()
        except (OSError, ValueError, IndexError):
            return None

    def _tree_seconds(self) -> float:
        parents: dict[int, int] = {}
        times: dict[int, float] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            rest = stat.rsplit(")", 1)[1].split()  # fields after the command name
            pid = int(entry.name)
            parents[pid] = int(rest[1])
            times[pid] = (int(rest[11]) + int(rest[12])) / self.tick  # utime + stime
        me = os.getpid()
        total = 0.0
        for pid, seconds in times.items():
            p = pid
            while p > 1 and p != me:
                p = parents.get(p, 0)
            if p == me:
                total += seconds
        return total


def machine_info() -> dict[str, Any]:
    """The machine and software a figure was measured on."""
    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": _memory_gb(),
        "gpu": None,
        "python": platform.python_version(),
        "batchgen": __version__,
    }
    for name in ("vllm", "torch", "transformers", "pyarrow"):
        info[name] = _version(name)
    if info["torch"] is not None:
        import torch

        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            info["gpu"] = f"{count} x {torch.cuda.get_device_name(0)}"
    return info


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in (module, f"{module}-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


@contextmanager
def bench_folder(path: str | None) -> Iterator[Path]:
    if path is not None:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    folder = Path(tempfile.mkdtemp(prefix="batchgen-bench-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def reserve_stdout() -> Callable[[str], None]:
    """Route whatever else writes to stdout from now on (vLLM's logs, its engine processes'
    too) to stderr, and return a writer to the real stdout, kept for the one JSON object."""
    try:
        fd = sys.stdout.fileno()
        err = sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return print  # a captured stream (a test runner): nothing else writes there
    sys.stdout.flush()
    real = os.fdopen(os.dup(fd), "w")
    os.dup2(err, fd)

    def write(text: str) -> None:
        real.write(text + "\n")
        real.flush()

    return write


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, sort_keys=True, default=str)
