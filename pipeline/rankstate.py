"""One rank's resume state on disk: its manifest generations, its commit records and its lock.

    OUT/.batchgen/rank-00003/manifest-00000002.json   generation 2: status, fingerprint,
                                                      report, every shard committed before it
    OUT/.batchgen/rank-00003/head-00000002.json       generation 2 without its shard list, with
                                                      the rank's totals (RankSummary)
    OUT/.batchgen/rank-00003/commit-000012.json       one per shard committed since (ShardInfo),
                                                      with the rank's running totals
    OUT/.batchgen/rank-00003/lock                     held (lockf) while a process writes rank 3

Every file is written once under a name no other attempt uses and never rewritten or appended
to (what an object store offers: put a new object, read, list a prefix, delete). A commit
writes one small record; a run's start and end write a new manifest generation and delete
what it folds in. The rank's state is the newest generation plus the commit records after it.

`batchgen status` needs a rank's totals, not its shard list: the newest commit record carries
the rank's running totals (RankTotals, with the generation they extend) and each generation has
a small head beside it, so status reads two small files a rank whatever its shard count
(`RankSummary.load`). Both are additions that an older batchgen of the same resume format
ignores; state they are missing from (an older batchgen's, or a crash between a generation and
its head) is read the full way, generation and every commit record.

OUT may be a local `Path` or a `StorePath` (an object-store URL, pipeline/storage/outpath.py):
the same code reads and writes both; the few steps that differ (write once, the lock, the job
record) go to pipeline/storage/stateio.py on a store: PUT If-None-Match instead of a temporary
name, fsync and rename, and the rank's lease (OUT/.batchgen/leases/) instead of lockf.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import tempfile
import time
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import BatchgenError, OutputLocked
from pipeline.sinks import RANK_DIR_RE, fsync_dir, list_names, shard_seq, temp_path
from pipeline.storage import stateio
from pipeline.storage.outpath import is_store

STATE_DIR = ".batchgen"
MANIFEST_RE = re.compile(r"^manifest-(\d{8})\.json$")
COMMIT_RE = re.compile(r"^commit-(\d{6})\.json$")
HEAD_RE = re.compile(r"^head-(\d{8})\.json$")
# 3: shards record the input positions they hold (resume keeps ranges, not a set of ids) and
# carry a digest of the fingerprint; the run's shared settings are in .batchgen/job.json.
MANIFEST_VERSION = 3
# Manifest keys renamed in version 2, read from older manifests under their new names.
_RENAMED_KEYS = {"num_shards": "num_ranks", "total_rows": "total_prompts"}
# How long a starting run retries a taken rank lock. `batchgen status` takes it (shared) for a
# few microseconds to see whether a process holds it; a run starting then must not give up.
LOCK_RETRY_SECONDS = 1.0
# Lock files this process holds. POSIX locks belong to the process and closing any descriptor
# of the file drops them, so a probe from the holding process must not open and close it.
_HELD_LOCKS: set[Path] = set()


def manifest_path(out_dir: Path, rank: int) -> Path:
    """The folder of a rank's resume state: its manifest generations and commit records."""
    return out_dir / STATE_DIR / f"rank-{rank:05d}"


def engine_log_path(out_dir: Path, rank: int) -> Path:
    """Where a rank's engine writes its own log (vLLM's lines), appended across resumes; for an
    object-store OUT (no appends there), a local file named after it in the temporary folder."""
    if is_store(out_dir):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(out_dir))
        return Path(tempfile.gettempdir()) / "batchgen-logs" / slug / f"engine-rank-{rank:05d}.log"
    return out_dir / STATE_DIR / "logs" / f"engine-rank-{rank:05d}.log"


def lock_path(out_dir: Path, rank: int) -> Path:
    return manifest_path(out_dir, rank) / "lock"


def legacy_manifest_path(out_dir: Path, rank: int) -> Path:
    """Where batchgen before resume format 3 kept a rank's manifest (a flat folder)."""
    return out_dir / STATE_DIR / f"rank-{rank:05d}.json"


def state_ranks(out_dir: Path) -> list[int]:
    """The ranks that have a state folder in `out_dir` (started at least once), sorted."""
    names = list_names(out_dir / STATE_DIR)
    return sorted(int(m.group(1)) for n in names if (m := RANK_DIR_RE.match(n)))


def job_path(out_dir: Path) -> Path:
    """The job record: the settings every rank of the run shares, written once by the first
    rank to start, so a starting rank compares itself with one file, not with every rank."""
    return out_dir / STATE_DIR / "job.json"


def shard_names_crc(names: Iterable[str]) -> int:
    """An order-free digest of shard file names (the sum of their CRC-32s): what a rank's
    totals record of the shards they list, so a listing can be checked against it."""
    return sum(zlib.crc32(name.encode()) for name in names)


@dataclass(slots=True)
class RankTotals:
    """A rank's committed shards summed: what `batchgen status` shows of a rank. The newest
    commit record carries them and a generation's head has them, so status reads neither a
    shard list nor a record per commit. `add` costs the same at the millionth shard."""

    shards: int = 0
    prompts: int = 0
    rows: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    # shard_names_crc of the shards counted: status compares the rank folder's listing with it
    # to see whether a shard there is unlisted (committed just before a crash).
    names_crc: int = 0
    # The newest run's pace (the fleet view): when it began generating, its newest shard's
    # commit time and the prompts it committed; None before a shard with commit times.
    run_began: float | None = None
    run_last_commit: float | None = None
    run_prompts: int = 0

    @classmethod
    def of(cls, shards: Iterable[dict[str, Any]]) -> RankTotals:
        """The totals of a shard list (in commit order, for the pace of the newest run)."""
        totals = cls()
        for shard in sorted(shards, key=lambda s: s.get("committed_at") or 0.0):
            totals.add(shard)
        return totals

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RankTotals:
        """Totals as written by `asdict`; keys a newer batchgen added are left out."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def add(self, shard: dict[str, Any]) -> None:
        """Count one more committed shard (a manifest entry, ShardInfo as a dict)."""
        self.shards += 1
        self.prompts += shard["prompts"]
        self.rows += shard["rows"]
        self.errors += shard["errors"]
        self.prompt_tokens += shard["prompt_tokens"]
        self.completion_tokens += shard["completion_tokens"]
        for reason, n in shard["finish_reasons"].items():
            self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + n
        self.names_crc += shard_names_crc([shard["file"]])
        committed, generating = shard.get("committed_at"), shard.get("generate_seconds")
        if not committed or not generating:  # adopted, or recorded before commit times were
            return
        if self.run_last_commit is None or committed >= self.run_last_commit:
            began = committed - generating
            # The same run if its last shard came after this one's run began; else a new run.
            same = self.run_last_commit is not None and self.run_last_commit >= began
            self.run_prompts = (self.run_prompts if same else 0) + shard["prompts"]
            self.run_began, self.run_last_commit = began, committed
        elif self.run_began is not None and committed >= self.run_began:
            self.run_prompts += shard["prompts"]

    def run_rate(self, now: float) -> float | None:
        """Prompts per second of the newest run until `now`, or None before its first shard:
        a rank that stops committing slows down as time passes."""
        if self.run_began is None:
            return None
        return self.run_prompts / max(now - self.run_began, 1e-3)


@dataclass(slots=True)
class RankSummary:
    """A rank's committed state without its shard list: the head of its newest manifest
    generation and the totals of the newest commit record after it (`RankSummary.load`), what
    `batchgen status` reads; the fields are Manifest's."""

    rank: int
    num_ranks: int
    fingerprint: dict[str, Any]
    status: str = "running"
    total_prompts: int | None = None
    started_at: float = 0.0
    updated_at: float = 0.0
    host: str = ""
    pid: int = 0
    report: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION
    generation: int = -1
    totals: RankTotals = field(default_factory=RankTotals)

    @property
    def prompts_committed(self) -> int:
        return self.totals.prompts

    @property
    def rows_committed(self) -> int:
        return self.totals.rows

    @property
    def errors(self) -> int:
        return self.totals.errors

    @classmethod
    def load(cls, out_dir: Path, rank: int) -> RankSummary | None:
        """The rank's summary (None if it never started) from one listing of its state folder,
        its newest generation's head and its newest commit record: two small files however
        many shards it has. State without them (an older batchgen's; a crash between a
        generation and its head; a commit record left by a crash after a generation folded it
        in; a live writer replacing files since the listing) is read whole (`Manifest.load`)."""
        folder = manifest_path(out_dir, rank)
        names = list_names(folder)
        generations = [n for n in names if MANIFEST_RE.match(n)]
        if not generations:
            return None
        generation = int(MANIFEST_RE.match(generations[-1]).group(1))
        head = f"head-{generation:08d}.json"
        commits = [n for n in names if COMMIT_RE.match(n)]
        try:
            if head not in names:
                return _summary_of_state(out_dir, rank)
            summary = cls._from_head(_read_json(folder / head), generation)
            if commits:
                record = _read_json(folder / commits[-1])
                totals = record.get("totals")
                if totals is None or totals.get("generation") != generation:
                    return _summary_of_state(out_dir, rank)
                summary.totals = RankTotals.from_json(totals)
                summary.updated_at = max(summary.updated_at, record.get("committed_at") or 0)
        except FileNotFoundError:
            return _summary_of_state(out_dir, rank)
        return summary

    @classmethod
    def _from_head(cls, data: dict[str, Any], generation: int) -> RankSummary:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["totals"] = RankTotals.from_json(known.get("totals") or {})
        known["generation"] = generation  # the file's name says it
        return cls(**known)


def _summary_of_state(out_dir: Path, rank: int) -> RankSummary | None:
    """The summary of the rank's whole state, generation and every commit record."""
    manifest = Manifest.load(out_dir, rank)
    return manifest.summary() if manifest is not None else None


@dataclass(slots=True)
class Manifest:
    """One rank's committed progress, as `Manifest.load` assembles it from the rank's state
    folder: the latest manifest generation plus the commit records written after it."""

    rank: int
    num_ranks: int
    fingerprint: dict[str, Any]
    status: str = "running"  # running | finished | interrupted | failed
    total_prompts: int | None = None  # input rows (prompts) of this rank, when the source knows
    shards: list[dict[str, Any]] = field(default_factory=list)  # committed shard files
    started_at: float = 0.0
    updated_at: float = 0.0
    host: str = ""
    pid: int = 0
    report: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION
    generation: int = -1  # of the manifest file it was read from; -1: none written yet

    @property
    def prompts_committed(self) -> int:
        return sum(s["prompts"] for s in self.shards)

    @property
    def rows_committed(self) -> int:
        return sum(s["rows"] for s in self.shards)

    @property
    def errors(self) -> int:
        return sum(s["errors"] for s in self.shards)

    @classmethod
    def load(cls, out_dir: Path, rank: int) -> Manifest | None:
        """The rank's committed state (None if it never started): one listing of its state
        folder, its latest manifest generation and the commit records not yet folded in."""
        folder = manifest_path(out_dir, rank)
        names = list_names(folder)
        generations = [n for n in names if MANIFEST_RE.match(n)]
        if not generations:
            return None
        data = _read_json(folder / generations[-1])
        data = {_RENAMED_KEYS.get(k, k): v for k, v in data.items()}
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known.setdefault("version", 1)
        manifest = cls(**known)
        manifest.generation = int(MANIFEST_RE.match(generations[-1]).group(1))
        listed = {s["file"] for s in manifest.shards}
        for name in names:
            if COMMIT_RE.match(name):
                try:
                    entry = _read_json(folder / name)
                except FileNotFoundError:
                    # Folded into a newer generation since the listing (a live writer's end),
                    # or, on a store, listed before its PUT completed: not committed yet.
                    continue
                entry.pop("totals", None)  # the rank's, as of this record: not the shard's
                if entry["file"] not in listed:
                    manifest.shards.append(entry)
                    manifest.updated_at = max(manifest.updated_at, entry.get("committed_at") or 0)
        manifest.shards.sort(key=lambda s: s["file"])
        return manifest

    def summary(self) -> RankSummary:
        """This manifest without its shard list, their totals instead."""
        head = {k: getattr(self, k) for k in RankSummary.__dataclass_fields__ if k != "totals"}
        return RankSummary(**head, totals=RankTotals.of(self.shards))

    def save(self, out_dir: Path) -> None:
        """Write the next manifest generation (every shard, the status and report) under a new
        name, then its head (the same without the shard list, with their totals), then remove
        what they replace: older generations and heads and the commit records it folds in.
        Called at a run's start and end, never per shard; a crash between the write and the
        removals leaves records that the new generation already lists (read once)."""
        self.updated_at = time.time()
        self.version = MANIFEST_VERSION
        folder = manifest_path(out_dir, self.rank)
        folder.mkdir(parents=True, exist_ok=True)
        before = [
            n
            for n in list_names(folder)
            if MANIFEST_RE.match(n) or HEAD_RE.match(n) or COMMIT_RE.match(n)
        ]
        generation = self.generation + 1
        data = asdict(self)
        del data["generation"]
        write_new(folder / f"manifest-{generation:08d}.json", data)
        self.generation = generation
        # After the generation, which is what resume reads: a head is never newer than it. The
        # generation is written, so a disk filling up just now must not fail the save: without
        # its head, status reads the generation instead.
        head = asdict(self.summary())
        del head["generation"]
        with contextlib.suppress(OSError):
            write_new(folder / f"head-{generation:08d}.json", head)
        for name in before:
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()

    def record_commit(self, out_dir: Path, info: dict[str, Any], totals: RankTotals) -> None:
        """Record one committed shard: a new commit record, written once, never rewritten, that
        carries `totals` (the rank's, this shard counted) and the generation they extend; the
        cost of the millionth commit is that of the first."""
        # Counted first: the shard is published, so it is committed even if this write fails
        # (the next run adopts it), and a failure message counts its rows as safe.
        self.shards.append(info)
        if is_store(out_dir):  # a writer whose lease was taken over must not record a shard
            stateio.check_writer(out_dir, self.rank)
        record = {**info, "totals": {**asdict(totals), "generation": self.generation}}
        write_new(manifest_path(out_dir, self.rank) / commit_record_name(info["file"]), record)


def commit_record_name(shard: str) -> str:
    """The commit record of a shard file: commit-<seq>.json."""
    return f"commit-{shard_seq(shard):06d}.json"


def write_new(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON file under a name nothing else writes (a temporary name, fsync, rename,
    fsync of the folder): what an object store's PUT of a new object gives (If-None-Match,
    there). A full disk fails here and leaves no file under `path`."""
    if is_store(path):
        stateio.write_once(path, json.dumps(data, indent=1, sort_keys=True).encode())
        return
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, OSError) as exc:
        raise BatchgenError(
            f"{path} is unreadable ({exc}); it is batchgen's resume state: restore it, or "
            "pass --overwrite to start this rank afresh"
        ) from exc


class RankLock:
    """An exclusive lock on one rank of an output folder.

    POSIX record locks (lockf) are released by the kernel when their process dies, however it
    dies, so a lock left by a killed run never blocks the next; they also work on NFS. On an
    object store, the rank's lease (stateio.StoreRankLock) stands in for lockf.
    """

    def __init__(self, out_dir: Path, rank: int) -> None:
        self.path = lock_path(out_dir, rank)
        self.rank = rank
        self._file = None
        self._lease = stateio.StoreRankLock(out_dir, rank) if is_store(out_dir) else None

    def acquire(self) -> RankLock:
        """Take the lock, or raise OutputLocked naming the holder (OSError if it cannot be made)."""
        if self._lease is not None:
            self._lease.acquire()
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        if key in _HELD_LOCKS:  # a second run in this process: lockf would let it through
            raise self._locked(f"this process (pid {os.getpid()})")
        f = open(self.path, "a+")  # noqa: SIM115 - held for the life of the run
        deadline = time.monotonic() + LOCK_RETRY_SECONDS
        while True:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise self._locked(holder) from None
        # Who holds it, for the refusal above and `batchgen status`. Only informative: on a
        # full disk this write fails and the run then stops at its first manifest write.
        with contextlib.suppress(OSError):
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%F %T')}\n")
            f.flush()
        self._file = f
        _HELD_LOCKS.add(key)
        return self

    def _locked(self, holder: str) -> OutputLocked:
        return OutputLocked(
            f"rank {self.rank} of {self.path.parent.parent.parent} is being written by {holder}; "
            "wait for it to finish or stop it (a killed process releases the lock at once), "
            "or write to another --output"
        )

    def release(self) -> None:
        if self._lease is not None:
            self._lease.release()
        if self._file is not None:
            _HELD_LOCKS.discard(self.path.resolve())
            with contextlib.suppress(OSError):
                self._file.close()  # closing drops the lock
            self._file = None


def lock_holder(out_dir: Path, rank: int) -> str | None:
    """Who holds a rank's lock now ("pid 12 on node3 since ..."), or None if no live process does.

    Probes with a non-blocking shared lock on a read-only descriptor: it needs no write access,
    changes nothing, and a manifest that says "running" under a free lock means a dead process.
    """
    if is_store(out_dir):
        return stateio.lease_holder(out_dir, rank)
    path = lock_path(out_dir, rank)
    # resolve() costs a stat per path component: only a process that holds locks pays it.
    if _HELD_LOCKS and path.resolve() in _HELD_LOCKS:
        return f"pid {os.getpid()} on {socket.gethostname()} (this process)"
    try:
        f = open(path)  # noqa: SIM115 - closed below; closing drops the probe's lock
    except OSError:
        return None
    with f:
        try:
            fcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return f.read().strip() or "another process"
    return None
