"""The input listing: every input file's name, size, row count and digest, computed once per job
and kept in one job-level file that every rank and `batchgen plan` read.

    OUT/.batchgen/inputs-<digest>.json.gz    {"kind", "spec", "schema", "files": [[name, size,
                                              rows, digest], ...]}, written once, never rewritten

The fingerprint holds the listing's digest (`listing_sha256`), its file and row counts, not the
list, so a shard's and a manifest's size does not grow with the input's file count.

Who makes it: the first rank to start claims `OUT/.batchgen/inputs.claim` (an exclusive create)
and computes the listing: one footer read per Parquet file (or one read of each JSONL file),
several files at a time; the other ranks wait for it (the claim's time stamp is refreshed while
the work goes on; a claim left by a dead rank is taken over after CLAIM_STALE_SECONDS, at once
when that rank ran on this machine). A rank
then opens only the files it owns, and checks each against its entry (size and digest) before it
reads it: a file resized or rewritten since the job listed it is noticed by the rank that would
read it. Every rank also lists the input's names (a folder listing: no file opened, no stat), so
a file added or removed is noticed by every rank.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.sinks import create_file_once

log = logging.getLogger("batchgen")

LISTING_VERSION = 1
LISTING_GLOB = "inputs-*.json.gz"
CLAIM_NAME = "inputs.claim"
# A claim whose time stamp is older than this belongs to a rank that died while listing.
CLAIM_STALE_SECONDS = 60.0
HEARTBEAT_SECONDS = 5.0
POLL_SECONDS = 0.2
# A wait for another rank's listing is told only once it lasts this long: ranks starting together
# meet here in the normal course, and a wait of a moment is not news.
TELL_AFTER_SECONDS = 5.0


def listing_digest(files: list[list[Any]]) -> str:
    """The digest of a listing's entries: what the fingerprint keeps instead of the list. An
    earlier batchgen's fingerprint held the same entries, so its digest is computed alike."""
    text = json.dumps(files, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def listing_name(digest: str) -> str:
    """The job-level file of the listing with this digest."""
    return f"inputs-{digest[:16]}.json.gz"


@dataclass(slots=True)
class Listing:
    """Every file of one input, in input order: [name, size, rows, digest] each."""

    kind: str  # "parquet" | "openai_batch"
    spec: str
    files: list[list[Any]]
    schema: str | None = None  # a Parquet input's Arrow schema (IPC, hex)
    # Row-group sizes of files whose footer this process read while listing, by name: not
    # stored, they spare the owner a second footer read right after listing.
    row_groups: dict[str, list[int]] = field(default_factory=dict)
    _digest: str | None = None

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = listing_digest(self.files)
        return self._digest

    @property
    def rows(self) -> int:
        return sum(f[2] for f in self.files)

    def identity(self) -> dict[str, Any]:
        """What the fingerprint records of the input: fixed-size whatever the file count."""
        return {
            "kind": self.kind,
            "spec": self.spec,
            "files": len(self.files),
            "rows": self.rows,
            "listing_sha256": self.digest,
        }

    def matches(self, kind: str, spec: str, present: list[tuple[str, int | None]]) -> bool:
        """Whether this lists the files found now, by name, in order, and by size where the
        listing of the input gave one (a store's does; a local folder's gives names only)."""
        if kind != self.kind or spec != self.spec or len(present) != len(self.files):
            return False
        return all(
            name == f[0] and size in (None, f[1])
            for (name, size), f in zip(present, self.files, strict=True)
        )

    def owned(self, start: int, stop: int) -> list[tuple[int, int]]:
        """(file index, input position of its first row) of the files holding rows in
        [start, stop): the only files a rank that owns those rows opens."""
        out, offset = [], 0
        for i, f in enumerate(self.files):
            if offset >= stop:
                break
            if offset + f[2] > start and f[2]:
                out.append((i, offset))
            offset += f[2]
        return out

    def changes(self, other: Listing, limit: int = 5) -> list[str]:
        """The files whose entries differ between two listings, in words (a few)."""
        mine = {f[0]: f for f in self.files}
        theirs = {f[0]: f for f in other.files}
        lines = []
        for name in sorted(set(mine) | set(theirs)):
            a, b = mine.get(name), theirs.get(name)
            if a is None:
                lines.append(f"{name} added")
            elif b is None:
                lines.append(f"{name} removed")
            elif a != b:
                lines.append(f"{name} changed ({_entry(a)} -> {_entry(b)})")
        more = len(lines) - limit
        return lines[:limit] + ([f"and {more:,} more"] if more > 0 else [])

    def to_json(self) -> dict[str, Any]:
        return {
            "version": LISTING_VERSION,
            "kind": self.kind,
            "spec": self.spec,
            "schema": self.schema,
            "files": self.files,
        }


def _entry(f: list[Any]) -> str:
    return f"{f[1]:,} bytes, {f[2]:,} rows, digest {f[3]}"


def read_listing(path: Path) -> Listing:
    """A stored listing (raises OSError or ValueError if unreadable)."""
    with gzip.open(path, "rt") as fh:
        data = json.load(fh)
    return Listing(data["kind"], data["spec"], data["files"], data.get("schema"))


def save_listing(state_dir: Path, listing: Listing) -> Path:
    """Write a listing under its digest's name, once: a temporary file, fsync, then a hard
    link (never replaces a file), so ranks racing to save the same listing leave one."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / listing_name(listing.digest)
    if path.exists():
        return path
    raw = json.dumps(listing.to_json(), separators=(",", ":")).encode()
    create_file_once(path, gzip.compress(raw, mtime=0))
    return path


def stored_listing(state_dir: Path, digest: str) -> Listing | None:
    """The listing with this digest kept in `state_dir` (a job record names it), or None."""
    path = state_dir / listing_name(digest)
    try:
        return read_listing(path)
    except FileNotFoundError:
        return None


def find_listing(
    state_dir: Path, kind: str, spec: str, present: list[tuple[str, int | None]]
) -> Listing | None:
    """A listing kept in `state_dir` that lists the files found now (names and sizes)."""
    try:
        paths = sorted(state_dir.glob(LISTING_GLOB), key=_mtime, reverse=True)
    except OSError:
        return None
    for path in paths:
        try:
            listing = read_listing(path)
        except (OSError, ValueError, KeyError):
            continue  # half-written by an older batchgen, or removed meanwhile: not usable
        if listing.matches(kind, spec, present):
            return listing
    return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@dataclass(frozen=True, slots=True)
class ListingStore:
    """Where a job keeps its listing (OUT/.batchgen), and whether this process may add one
    (a run may; `batchgen plan` and `tune` only read)."""

    state_dir: Path
    save: bool = False


def job_listing(
    store: ListingStore | None,
    kind: str,
    spec: str,
    present: list[tuple[str, int | None]],
    compute: Callable[[], Listing],
) -> Listing:
    """The job's listing of the files found now: a stored one that matches them, else one
    computed here, by at most one rank at a time (see the module docstring)."""
    if store is None:
        return compute()
    found = find_listing(store.state_dir, kind, spec, present)
    if found is not None:
        return found
    if not store.save:
        return compute()
    told, began = False, time.monotonic()
    while True:
        with _claim(store.state_dir) as holder:
            if holder is None:  # ours
                found = find_listing(store.state_dir, kind, spec, present)
                if found is None:
                    found = compute()
                    save_listing(store.state_dir, found)
                return found
        if not told and time.monotonic() - began >= TELL_AFTER_SECONDS:
            log.info("waiting for the input listing that %s is making", holder)
            told = True
        time.sleep(POLL_SECONDS)
        found = find_listing(store.state_dir, kind, spec, present)
        if found is not None:
            return found


@contextlib.contextmanager
def _claim(state_dir: Path) -> Iterator[str | None]:
    """Claim the listing work: yields None when this process holds the claim (its time stamp
    refreshed every HEARTBEAT_SECONDS until the block ends), else who holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / CLAIM_NAME
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        yield _holder_or_take_over(path)
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(me + "\n")
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), daemon=True)
    beat.start()
    try:
        yield None
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(OSError):
            path.unlink()


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        with contextlib.suppress(OSError):
            os.utime(path)


def _holder_or_take_over(path: Path) -> str:
    """Who holds the claim; a claim not refreshed for CLAIM_STALE_SECONDS is removed (its rank
    died), so the next attempt takes it."""
    try:
        holder = path.read_text().strip() or "another rank"
        age = time.time() - path.stat().st_mtime
    except OSError:
        return "another rank"  # released meanwhile
    if age > CLAIM_STALE_SECONDS or _dead_here(holder):
        log.warning("%s stopped making the input listing; taking it over", holder)
        with contextlib.suppress(OSError):
            stale = path.with_name(f"{path.name}.stale-{os.getpid()}")
            os.rename(path, stale)  # one waiter wins the rename, the others retry
            stale.unlink()
    return holder


def _dead_here(holder: str) -> bool:
    """Whether a claim's holder ("pid 12 on node3") is a process of this machine that is gone
    (killed while listing): its claim need not age out."""
    parts = holder.split()
    if len(parts) != 4 or parts[0] != "pid" or parts[2] != "on" or not parts[1].isdigit():
        return False
    if parts[3] != socket.gethostname():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def remove_listings(state_dir: Path, keep: str | None = None) -> None:
    """Remove the stored listings but the one with digest `keep` (a new job record names it)."""
    keep_name = listing_name(keep) if keep else None
    for path in state_dir.glob(LISTING_GLOB):
        if path.name != keep_name:
            with contextlib.suppress(OSError):
                path.unlink()
