"""Process supervision of the in-process engine: why an engine process ended, killing its
process tree, a reaper that kills it should batchgen die first, and the shared memory its
killed processes leave. Knows processes (psutil), not vLLM."""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("batchgen")

# How long closing an engine waits, past its first 5 s, for killed engine processes to be gone.
KILL_WAIT_SECONDS = 60
# Killed processes that free gigabytes on a loaded machine routinely take several seconds to go:
# a wait this long is said nothing of (it is no news to a user), a longer one is told.
QUIET_KILL_WAIT_SECONDS = 15


def exit_cause(code: int) -> str:
    if code >= 0:
        return f"the engine process exited with code {code}"
    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    if -code == signal.SIGKILL:
        return f"the engine process was killed by {name} (out of memory? see `dmesg`)"
    return f"the engine process was killed by {name}"


def process_tree(proc: Any) -> list[Any]:
    """A process (anything with a `pid`) and its children, as psutil.Process; [] when gone."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, ValueError, TypeError):
        return []


def kill_tree(processes: list[Any]) -> None:
    """SIGKILL vLLM's engine processes and their children (workers), stopped or not."""
    import psutil

    for proc in processes:
        victims = process_tree(proc)
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.kill()
        _, alive = psutil.wait_procs(victims, timeout=QUIET_KILL_WAIT_SECONDS)
        if alive:
            # A killed process that frees gigabytes on a loaded machine can take a while; a
            # batchgen that exits first leaves it in its job, where a scheduler killing the job
            # next waits for it (Slurm drains the node when that wait runs out).
            log.warning(
                "vLLM's engine processes %s are still exiting %d s after SIGKILL; waiting for "
                "them (up to %d s more)",
                ", ".join(str(p.pid) for p in alive),
                QUIET_KILL_WAIT_SECONDS,
                KILL_WAIT_SECONDS,
            )
            _, alive = psutil.wait_procs(alive, timeout=KILL_WAIT_SECONDS)
            for victim in alive:
                log.warning(
                    "vLLM engine process %d outlived SIGKILL (state %s)", victim.pid, _state(victim)
                )


def _state(proc: Any) -> str:
    import psutil

    try:
        return str(proc.status())
    except psutil.Error:
        return "gone"


_REAPER_CODE = """
import os, signal, sys
pids = []
for line in sys.stdin:
    if line.strip() == "done":
        sys.exit(0)
    pids.append(int(line))
for pid in pids:  # end of input without "done": batchgen died without closing its engine
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().startswith("VLLM"):
                os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""


class Reaper:
    """A tiny process in its own session holding a pipe from this one: if batchgen dies
    without closing its engine (SIGKILL, the OOM killer), the pipe closes and the reaper kills
    vLLM's engine processes, which watch nothing and would otherwise idle on, holding memory
    (and a GPU) for good."""

    def __init__(self, processes: list[Any]) -> None:
        pids = [member.pid for proc in processes for member in process_tree(proc)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _REAPER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        self.proc.stdin.write("".join(f"{pid}\n" for pid in pids))
        self.proc.stdin.flush()

    def release(self) -> None:
        """The engine is closed: the reaper exits without killing anything."""
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write("done\n")
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def shared_memory_of(processes: list[Any]) -> list[str]:
    """The POSIX shared-memory segments (/dev/shm/psm_*) vLLM's engine processes map."""

    names: set[str] = set()
    for proc in processes:
        for member in process_tree(proc):
            try:
                maps = Path(f"/proc/{member.pid}/maps").read_text()
            except OSError:
                continue
            names.update(re.findall(r"/dev/shm/(psm_\w+)", maps))
    return sorted(names)


def release_shared_memory(names: list[str]) -> None:
    """Remove the segments of engine processes that were killed (or force-killed by vLLM's own
    shutdown) before they could: otherwise Python's resource tracker removes them at exit
    with a "leaked shared_memory objects" warning."""
    from multiprocessing import resource_tracker

    for name in names:
        path = Path("/dev/shm") / name
        if not path.exists():
            continue  # its creator removed it (and unregistered it) itself
        with contextlib.suppress(OSError):
            path.unlink()
        resource_tracker.unregister(f"/{name}", "shared_memory")
