"""Keep the terminal's Ctrl-C (and hangup) away from vLLM's engine processes.

A terminal sends SIGINT to its whole foreground process group, and vLLM's engine core (a child
of batchgen, started by multiprocessing) is in that group; its own SIGINT handler shuts it down
at once, so the run would lose its in-flight requests and report an engine death instead of
draining. Engine processes started inside `own_session()` begin life in a session of their own
(setsid: no controlling terminal, so no Ctrl-C, Ctrl-\\ or hangup from it; their workers stay in
that session): Ctrl-C reaches batchgen alone, which drains and then closes the engine itself.

vLLM starts its processes with multiprocessing's `fork` (its default) or `spawn` (forced by its
CPU backend, and when CUDA is initialized). A fork runs Python's at-fork hooks, so the child
calls setsid itself; a spawn execs a fresh interpreter through `multiprocessing.util.
spawnv_passfds`, which offers no hook, so for the block's duration that function execs through a
two-line Python shim that calls setsid and then execs the interpreter multiprocessing asked for
(same pid, same inherited descriptors). Blocking SIGINT instead would not do: Python's
subprocess machinery clears the signal mask of the child, and vLLM installs its own handler.

Cleanup does not depend on the terminal: batchgen closes the engine on every exit it lives
through, and the reaper in engines/supervise.py (pid based) kills it when batchgen is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

# argv: the interpreter multiprocessing asked for, then its arguments.
_SETSID_EXEC = "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"

_detaching = False
_registered = False


def _leave_session() -> None:
    """In a freshly forked child: a session of its own, if forked during `own_session()`."""
    global _detaching
    if _detaching:
        _detaching = False  # the processes it starts stay in its new session
        with contextlib.suppress(OSError):
            os.setsid()


@contextlib.contextmanager
def own_session() -> Iterator[None]:
    """Processes multiprocessing starts inside this block (fork or spawn) get a session of
    their own, so a terminal's Ctrl-C or hangup does not reach them."""
    global _detaching, _registered
    import multiprocessing.util as mp_util

    if not _registered:
        os.register_at_fork(after_in_child=_leave_session)
        _registered = True
    spawn = mp_util.spawnv_passfds

    def spawn_in_own_session(path: str | bytes, args: list[str], passfds: tuple[int, ...]) -> int:
        shim = [sys.executable, "-I", "-S", "-c", _SETSID_EXEC, os.fsdecode(path), *args[1:]]
        return spawn(os.fsencode(sys.executable), shim, passfds)

    mp_util.spawnv_passfds = spawn_in_own_session
    _detaching = True
    try:
        yield
    finally:
        _detaching = False
        mp_util.spawnv_passfds = spawn
