"""One writer per rank without flock: a lease object per rank holding the holder, its last
heartbeat and an expiry. Created with If-None-Match and renewed or taken over with If-Match where
the store has conditional writes, so of two writers racing exactly one wins. A live holder's
lease refuses a second writer; a dead holder's lease is taken over once it has expired.

Expiry is judged by the wall clock of the process that reads the lease: keep `ttl_s` well above
the clock skew between nodes (minutes, with a heartbeat every ttl/3)."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pipeline.errors import BatchgenError, OutputLocked
from pipeline.storage.store import ObjectStore

DEFAULT_TTL_S = 300.0


class LeaseHeld(OutputLocked):
    """A live writer holds the lease."""


class LeaseLost(BatchgenError):
    """Another writer took the lease over (this one was presumed dead): stop writing."""


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """What a lease object holds."""

    holder: str  # "pid 12 on node3 (id)"
    heartbeat: float  # wall-clock seconds of the last renewal
    expires: float  # heartbeat + ttl
    host: str = ""  # the holder's host and pid: on that host, a gone process is a dead holder
    pid: int = 0

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord | None:
        try:
            raw = json.loads(data)
            return cls(
                str(raw["holder"]),
                float(raw["heartbeat"]),
                float(raw["expires"]),
                str(raw.get("host", "")),
                int(raw.get("pid", 0)),
            )
        except (ValueError, KeyError, TypeError):
            return None  # a torn or foreign object: treated as expired

    def alive(self, now: float) -> bool:
        """Whether the holder may still be writing: unexpired, and, when it ran on this host,
        its process still there (a killed writer's lease is free at once, as lockf's is)."""
        if self.expires <= now:
            return False
        if self.host == socket.gethostname() and self.pid > 0:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        return True


def lease_name(rank: int) -> str:
    """The lease object of a rank, under the output's state prefix."""
    return f".batchgen/leases/rank-{rank:05d}.json"


class Lease:
    """The lease `name` in `store`, for this process; `acquire`, `renew` often, `release`."""

    def __init__(
        self,
        store: ObjectStore,
        name: str,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.name, self.ttl_s, self.clock = store, name, ttl_s, clock
        self.holder = f"pid {os.getpid()} on {socket.gethostname()} ({uuid.uuid4().hex[:8]})"
        self._etag: str | None = None

    def _record(self) -> bytes:
        now = self.clock()
        record = LeaseRecord(self.holder, now, now + self.ttl_s, socket.gethostname(), os.getpid())
        return record.to_bytes()

    def acquire(self) -> Lease:
        """Take the lease: LeaseHeld if a live holder has it; a dead holder's is taken over."""
        etag = self.store.put_if_absent(self.name, self._record())
        if etag is None:
            data, current = self.store.read_with_etag(self.name)
            record = None if data is None else LeaseRecord.parse(data)
            if data is None:  # released between our two calls
                etag = self.store.put_if_absent(self.name, self._record())
            elif record is not None and record.holder == self.holder:
                etag = current  # our own create, retried after its answer was lost
            elif record is not None and record.alive(self.clock()):
                raise self._held(record)
            else:
                assert current is not None
                etag = self.store.put_if_match(self.name, self._record(), current)
            if etag is None:  # another writer won the race for it
                data = self.store.read(self.name)
                record = None if data is None else LeaseRecord.parse(data)
                raise self._held(record)
        self._etag = etag
        return self

    def renew(self) -> None:
        """The heartbeat: extend the expiry; LeaseLost if another writer took the lease."""
        assert self._etag is not None, "renew() before acquire()"
        etag = self.store.put_if_match(self.name, self._record(), self._etag)
        if etag is None:
            data, current = self.store.read_with_etag(self.name)
            record = None if data is None else LeaseRecord.parse(data)
            if record is not None and record.holder == self.holder:
                self._etag = current  # our own renewal, retried after its answer was lost
                return
            who = record.holder if record else "nobody"
            raise LeaseLost(
                f"the lease {self.store.url_of(self.name)} is now held by {who}: this writer "
                f"was presumed dead (no heartbeat for {self.ttl_s:.0f} s); it stops writing"
            )
        self._etag = etag

    def release(self) -> None:
        """Give the lease up (only if still ours)."""
        if self._etag is None:
            return
        data, etag = self.store.read_with_etag(self.name)
        if data is not None and etag == self._etag:
            self.store.delete(self.name)
        self._etag = None

    def _held(self, record: LeaseRecord | None) -> LeaseHeld:
        if record is None:
            return LeaseHeld(
                f"{self.store.url_of(self.name)}: another writer took the lease at the same "
                "moment; only one writer per rank may run; rerun if it has stopped"
            )
        left = max(record.expires - self.clock(), 0)
        if record.host == socket.gethostname():
            fix = "stop it (the lease is free as soon as its process is gone)"
        else:
            fix = f"stop it, or if it died, rerun after its lease expires in {left:.0f} s"
        return LeaseHeld(
            f"{self.store.url_of(self.name)} is held by {record.holder} (last heartbeat "
            f"{self.clock() - record.heartbeat:.0f} s ago); only one writer per rank may run: {fix}"
        )
