"""What the tests' loopback servers (tests/seaweedfs.py, tests/gcsemulator.py) share: free
ports, and a server process in a session of its own that a test can SIGKILL mid-run (no goodbye
to its clients), restart on the same ports, and stop at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_ports(n: int) -> list[int]:
    """N distinct ports free on 127.0.0.1 now (all bound at once, so no two are the same)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LoopbackServer:
    """A server process started by `start()` (the subclass's) as `self.proc`."""

    proc: subprocess.Popen | None

    def start(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        """SIGKILL the server (no goodbye to its clients)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None
