"""A real FTP server on loopback for the tests of `--output` on an fsspec filesystem without
conditional writes: pyftpdlib (PyPI `pyftpdlib`, pure Python, in the `dev` extra), anonymous
with write access, on a free port, its files in a temporary folder; batchgen reaches it through
fsspec's built-in `ftp://` (FTPFileSystem). Stopped at the end of the session."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from loopback import LoopbackServer, free_ports

START_TIMEOUT_S = 30.0
# pyftpdlib, anonymous with write access (its `python -m pyftpdlib -w`), and an idle timeout.
_SERVE = """
import sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer
port, root, idle = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
users = DummyAuthorizer()
users.add_anonymous(root, perm="elradfmwMT")
FTPHandler.authorizer, FTPHandler.timeout = users, idle
FTPServer(("127.0.0.1", port), FTPHandler).serve_forever()
"""


@dataclass
class FtpServer(LoopbackServer):
    """One pyftpdlib process; `url` is its root as an ftp:// URL."""

    root: Path
    idle_timeout_s: float = 300.0  # the server closes a control connection idle this long
    port: int = field(default_factory=lambda: free_ports(1)[0])
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ftp://127.0.0.1:{self.port}"

    def start(self) -> None:
        pytest.importorskip(
            "pyftpdlib", reason="the FTP tests need pyftpdlib: pip install pyftpdlib"
        )
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        cmd = [sys.executable, "-c", _SERVE, str(self.port), str(data), str(self.idle_timeout_s)]
        log = open(self.root / "ftp.log", "ab")  # noqa: SIM115 - the child keeps it open
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pyftpdlib exited: see {self.root / 'ftp.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(3) == b"220":  # the server's greeting
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"pyftpdlib did not start in {START_TIMEOUT_S} s")

    def fresh_prefix(self) -> str:
        """A new folder on the server, for one test (made by batchgen as it writes)."""
        return f"{self.url}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def ftp(tmp_path_factory) -> FtpServer:
    """The session's FTP server (started once, stopped at the end)."""
    server = FtpServer(tmp_path_factory.mktemp("ftp"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
