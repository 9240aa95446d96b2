"""The object stores batchgen writes to, as one fixture for tests that hold for each: `store`
is SeaweedFS (s3://) or fake-gcs-server (gs://), running on loopback, its variables set, with
`fresh_prefix()`, `kill()` and `start()`. A test module takes the fixtures it uses by name:

    seaweed, s3, fake_gcs, gcs = objstores.seaweed, objstores.s3, objstores.fake_gcs, objstores.gcs
    store = objstores.store
"""

from __future__ import annotations

from dataclasses import dataclass

import gcsemulator
import pytest
import seaweedfs

seaweed, s3 = seaweedfs.seaweed, seaweedfs.s3
fake_gcs, gcs = gcsemulator.fake_gcs, gcsemulator.gcs


@dataclass
class StoreUnderTest:
    """One running store and what a test needs of it."""

    scheme: str  # "s3" or "gs"
    server: seaweedfs.SeaweedS3 | gcsemulator.FakeGcs
    bucket: str

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def fresh_prefix(self) -> str:
        """A new prefix in the session's bucket, for one test."""
        if self.scheme == "s3":
            return seaweedfs.fresh_prefix()
        return gcsemulator.fresh_prefix()

    def kill(self) -> None:
        """SIGKILL the server (its objects stay on disk)."""
        self.server.kill()

    def start(self) -> None:
        self.server.start()


@pytest.fixture(params=["s3", "gs"])
def store(request: pytest.FixtureRequest) -> StoreUnderTest:
    """Each store batchgen writes to, running, with its variables set for this test."""
    if request.param == "s3":
        return StoreUnderTest("s3", request.getfixturevalue("s3"), seaweedfs.BUCKET)
    return StoreUnderTest("gs", request.getfixturevalue("gcs"), gcsemulator.BUCKET)
