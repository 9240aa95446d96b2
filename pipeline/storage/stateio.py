"""The object-store side of the rank-state I/O: what rename, fsync and lockf do on a local disk,
done with what an object store offers. pipeline/rankstate.py, pipeline/checkpoint.py and
pipeline/sinks.py call these for a `StorePath` and keep their POSIX code for a local `Path`.

  write_once(path, data)     a commit record or manifest generation: PUT If-None-Match
  create_once(path, data)    the job record: PUT If-None-Match; False if another rank won
  put_object(path, data)     a shard's final bytes, one PUT (multipart when large), no rename
  StoreRankLock              the rank's lease (pipeline/storage/lease.py) plus its heartbeat
  lease_holder(out, rank)    who holds a live lease, for `batchgen status` and --overwrite
  check_then_write_warning   the run's one warning where the store has no conditional writes
"""

from __future__ import annotations

import contextlib
import threading
import time

import pyarrow as pa

from pipeline.storage.lease import DEFAULT_TTL_S, Lease, LeaseLost, LeaseRecord, lease_name
from pipeline.storage.outpath import StorePath
from pipeline.storage.retry import StoreDown
from pipeline.storage.store import ObjectExists

# Leases this process holds, by (output root, rank): a commit checks its writer still holds one.
_HELD: dict[tuple[str, int], StoreRankLock] = {}


def _name(path: StorePath) -> str:
    return path.rel


def write_once(path: StorePath, data: bytes) -> None:
    """Write an object under a name nothing else writes; ObjectExists if another writer did.
    A retried PUT whose first answer was lost finds its own bytes there: that is a success."""
    try:
        path.store.put_new(_name(path), data)
    except ObjectExists:
        if path.store.read(_name(path)) != data:
            raise


def create_once(path: StorePath, data: bytes) -> bool:
    """Create `path` unless it exists (If-None-Match); whether this call created it."""
    return path.store.put_if_absent(_name(path), data) is not None


def put_object(path: StorePath, data: bytes | pa.Buffer) -> None:
    """Upload a shard's final bytes under its unique name (retried whole on transient errors;
    a cut-off upload leaves no object, or an abandoned multipart upload nobody lists)."""
    path.store.write(_name(path), data)


def check_then_write_warning(out_dir: StorePath) -> str | None:
    """The warning a run on an fsspec filesystem (ftp://, sftp://, ...) prints once at its
    start: the store enforces no conditions, so the lease and the job record are
    check-then-write. None on S3 and GCS, whose conditional-write paths are their own."""
    loc = out_dir.store.loc
    if loc.s3 is not None or loc.gcs is not None or out_dir.store.conditional:
        return None
    return (
        f"--output {loc.url}: {loc.scheme}:// has no conditional writes, so the rank's lease "
        "and the job record are check-then-write (two writers starting on one rank at the same "
        "instant could both pass); each shard is still written once under a unique name and "
        "counted only through its rank's state, so committed rows stay exactly once with one "
        "writer per rank"
    )


class StoreRankLock:
    """One writer per rank on an object store: the rank's lease, renewed by a heartbeat thread
    every third of its time to live. `check()` raises LeaseLost once another writer took it."""

    def __init__(self, out_dir: StorePath, rank: int, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.key = (str(out_dir), rank)
        self.rank = rank
        self.lease = Lease(out_dir.store, lease_name(rank), ttl_s)
        self._stop = threading.Event()
        self._lost: LeaseLost | None = None
        self._thread: threading.Thread | None = None

    def acquire(self) -> StoreRankLock:
        """Take the lease (LeaseHeld naming the live holder) and start the heartbeat."""
        self.lease.acquire()
        _HELD[self.key] = self
        self._thread = threading.Thread(
            target=self._beat, name=f"lease-rank-{self.rank}", daemon=True
        )
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.lease.ttl_s / 3):
            try:
                self.lease.renew()
            except LeaseLost as exc:
                self._lost = exc
                return
            except (OSError, StoreDown):
                continue  # the store is down: the commits fail and say so; try again later

    def check(self) -> None:
        """Raise LeaseLost if this writer no longer holds the rank (before each commit)."""
        if self._lost is not None:
            raise self._lost

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        _HELD.pop(self.key, None)
        if self._lost is None:
            with contextlib.suppress(OSError, StoreDown):  # else it expires by itself
                self.lease.release()


def check_writer(out_dir: StorePath, rank: int) -> None:
    """Before a commit record: LeaseLost if this process's lease on the rank was taken over."""
    held = _HELD.get((str(out_dir), rank))
    if held is not None:
        held.check()


def lease_holder(out_dir: StorePath, rank: int) -> str | None:
    """Who holds a live lease on the rank ("pid 12 on node3 (...)"), or None."""
    held = _HELD.get((str(out_dir), rank))
    if held is not None:
        return f"{held.lease.holder} (this process)"
    data = out_dir.store.read(lease_name(rank))
    record = None if data is None else LeaseRecord.parse(data)
    if record is None or not record.alive(time.time()):
        return None
    return record.holder
