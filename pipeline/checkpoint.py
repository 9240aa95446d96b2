"""Resume: what a rank keeps of earlier runs, the job record, --overwrite, and commits.

Layout of an output folder (the state folder is hidden, so readers see only shards):

    OUT/rank-00003/part-00003-000012.parquet     committed shards of rank 3 (pipeline/sinks.py)
    OUT/.batchgen/job.json                        the settings every rank shares, written once
    OUT/.batchgen/rank-00003/manifest-*.json      rank 3's manifest generations, commit records
    OUT/.batchgen/rank-00003/commit-*.json        and lock (pipeline/rankstate.py)

A commit publishes the shard (temporary name, fsync, rename), then writes its commit record.
A crash between the two leaves a complete shard no record lists; the next run adopts it after
checking the fingerprint digest in its footer, so no row is lost or written twice. Temporary
files of a crashed write are removed. On an object store (OUT a URL) a shard no record lists
is removed instead of adopted: its writer may have been a presumed-dead holder of the rank's
lease, whose rows the new holder writes again. Committed rows are known by input position
(pipeline/positions.py), so resume holds a few ranges, not an id per row.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.errors import BatchgenError, OutputLocked, ResumeMismatch
from pipeline.fingerprint import (
    current_form,
    diff_fingerprints,
    fingerprint_digest,
    shared_fingerprint,
)
from pipeline.positions import Positions
from pipeline.rankstate import (
    MANIFEST_VERSION,
    STATE_DIR,
    Manifest,
    RankLock,
    RankSummary,
    RankTotals,
    engine_log_path,
    job_path,
    legacy_manifest_path,
    lock_holder,
    lock_path,
    manifest_path,
    state_ranks,
)
from pipeline.sinks import (
    ShardInfo,
    create_file_once,
    output_ranks,
    rank_dir,
    read_shard_info,
    read_shard_metadata,
    shard_files,
    shard_path,
    shard_seq,
    temp_files,
)
from pipeline.sources.listing import remove_listings
from pipeline.storage import stateio
from pipeline.storage.outpath import is_store

# Re-exported: what other modules read of a rank's state comes through this module.
__all__ = [
    "STATE_DIR",
    "Checkpoint",
    "Manifest",
    "RankLock",
    "RankSummary",
    "engine_log_path",
    "lock_holder",
    "lock_path",
    "manifest_path",
    "preview_resume",
    "recorded_ranks",
    "remove_run",
    "scan_rank",
]


def recorded_ranks(out_dir: Path) -> dict[int, int]:
    """{rank: the rank count its manifest records} for every rank with a manifest in `out_dir`,
    from each rank's summary (two small files, not its shard list)."""
    found = {}
    for rank in state_ranks(out_dir):
        summary = RankSummary.load(out_dir, rank)
        if summary is not None:
            found[summary.rank] = summary.num_ranks
    return found


def remove_run(out_dir: Path, keep_rank: int | None = None) -> str:
    """--overwrite of a whole run at once (what `--data-parallel` does before starting its
    ranks, which would otherwise race to remove each other's old files, and what a rank does
    when the folder holds a run with other settings): every rank's shards, temporary files and
    manifests, and the job record. Refuses, removing nothing, while any rank's lock other than
    `keep_rank`'s (the caller's own) is held. What was removed, in words ("" if nothing)."""
    ranks = set(output_ranks(out_dir)) | set(state_ranks(out_dir))
    legacy = sorted((out_dir / STATE_DIR).glob("rank-*.json"))  # an earlier batchgen's
    for rank in sorted(ranks - {keep_rank}):
        holder = lock_holder(out_dir, rank)
        if holder is not None:
            raise OutputLocked(
                f"--overwrite would remove rank {rank} of {out_dir}, which {holder} is writing "
                "now; stop it first (a killed process releases its lock at once), or write to "
                "another --output"
            )
    removed = _remove_ranks(out_dir, ranks)
    for path in [*legacy, *out_dir.glob("part-*.parquet")]:
        path.unlink()
    job_path(out_dir).unlink(missing_ok=True)
    if legacy:
        removed = (removed + "; " if removed else "") + "the files of an earlier batchgen"
    return removed


def _remove_ranks(out_dir: Path, ranks: set[int]) -> str:
    """Remove these ranks' shards, temporary files and manifests (their locks stay: a lock
    may be held); what was removed, in words."""
    shards = manifests = 0
    for rank in sorted(ranks):
        for p in [*shard_files(out_dir, rank), *temp_files(out_dir, rank)]:
            p.unlink()
            shards += p.name.startswith("part-")
        with contextlib.suppress(OSError):
            rank_dir(out_dir, rank).rmdir()
        manifests += Manifest.load(out_dir, rank) is not None
        state = manifest_path(out_dir, rank)
        for p in state.iterdir() if is_store(state) or state.is_dir() else []:
            if p != lock_path(out_dir, rank):
                shutil.rmtree(p) if not is_store(p) and p.is_dir() else p.unlink()
    if not shards and not manifests:
        return ""
    return f"{shards} shard(s) and {manifests} manifest(s) of rank(s) {', '.join(map(str, sorted(ranks)))}"


def read_job_record(out_dir: Path) -> dict[str, Any] | None:
    """The job record of `out_dir` ({"fingerprint": the shared settings, "batchgen": the
    version that wrote it}), or None before any rank started."""
    try:
        return json.loads(job_path(out_dir).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError) as exc:
        raise BatchgenError(
            f"{job_path(out_dir)} is unreadable ({exc}); it is batchgen's record of the run's "
            "settings: restore it, or pass --overwrite to start afresh"
        ) from exc


def claim_job_record(out_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Write the job record unless one exists: the first rank to start writes it; a rank that
    loses the race finds it written (a hard link never replaces a file, unlike a rename)."""
    path = job_path(out_dir)
    if path.exists():
        return
    # Listings of other inputs (an earlier run's, removed by --overwrite) are not this job's.
    remove_listings(path.parent, (fingerprint.get("input") or {}).get("listing_sha256"))
    record = {
        "version": MANIFEST_VERSION,
        "batchgen": __version__,
        "fingerprint": shared_fingerprint(fingerprint),
    }
    data = json.dumps(record, indent=1, sort_keys=True).encode()
    if is_store(path):  # If-None-Match: of two ranks racing, one creates it
        stateio.create_once(path, data)
    else:
        create_file_once(path, data)


@dataclass(slots=True)
class RankScan:
    """One rank's files in an output folder judged against a run's fingerprint: the one reading
    of the resume rules that a run's start, --overwrite and `batchgen plan` share."""

    rank: int
    manifest: Manifest | None = None
    other_run: list[str] = field(default_factory=list)  # job record vs this run: changed fields
    changed: list[str] = field(default_factory=list)  # this rank's manifest vs this run
    legacy: str | None = None  # an output of an earlier batchgen this one cannot resume
    shards: list[dict[str, Any]] = field(default_factory=list)  # what a resume keeps, by name
    adopted: list[str] = field(default_factory=list)  # on disk, not listed, of this run
    missing: list[str] = field(default_factory=list)  # listed, gone from disk
    foreign: list[str] = field(default_factory=list)  # on disk, not of this run
    damaged: list[tuple[str, str]] = field(default_factory=list)  # listed, not as committed: why
    unlisted: list[str] = field(default_factory=list)  # on a store, no record names: removed
    done: Positions = field(default_factory=Positions)  # input positions the kept shards hold

    def refusals(self, out_dir: Path) -> list[str]:
        """Why a run with this fingerprint would be refused (none: it may resume)."""
        lines = [f"rank {self.rank}: {line}" for line in self.changed]
        if not lines:  # this rank's own manifest names the change, when it has one
            lines = [f"the other ranks: {line}" for line in self.other_run]
        if self.legacy:
            lines.append(self.legacy)
        lines += [
            f"{shard_path(out_dir, name)} is not a shard of this run" for name in self.foreign
        ]
        lines += [
            f"{shard_path(out_dir, name)} is committed but unreadable ({why})"
            for name, why in self.damaged
        ]
        return lines


def scan_rank(out_dir: Path, rank: int, fingerprint: dict[str, Any]) -> RankScan:
    """Read what `rank` holds in `out_dir` and what a run with `fingerprint` would keep: the job
    record, this rank's manifest and a listing of its shards; no other rank's file, and no
    shard's rows (committed positions come from the manifest, an unlisted shard's from its
    footer)."""
    scan = RankScan(rank)
    job = read_job_record(out_dir)
    if job is not None:
        theirs = current_form(job["fingerprint"])
        scan.other_run = diff_fingerprints(theirs, shared_fingerprint(fingerprint))
    manifest = scan.manifest = Manifest.load(out_dir, rank)
    legacy = legacy_manifest_path(out_dir, rank)
    if legacy.exists():
        scan.legacy = _legacy_note(out_dir, legacy)
    elif manifest is not None:
        scan.changed = diff_fingerprints(current_form(manifest.fingerprint), fingerprint)
    if scan.other_run or scan.changed or scan.legacy:
        return scan
    # Shards carry the digest of the fingerprint they were made under: this one's, or (written
    # before the input listing) that of the same settings in their earlier form.
    digests = {fingerprint_digest(fingerprint)}
    if manifest is not None:
        digests.add(fingerprint_digest(manifest.fingerprint))
    listed = {s["file"]: s for s in manifest.shards} if manifest is not None else {}
    sizes = {p.name: p.stat().st_size for p in shard_files(out_dir, rank)}
    for name, size in sizes.items():
        entry = listed.get(name)
        if entry is None and is_store(out_dir):
            scan.unlisted.append(name)
            continue
        if entry is None:
            meta = read_shard_metadata(shard_path(out_dir, name))
            if meta is None or meta.get("fingerprint_sha256") not in digests:
                scan.foreign.append(name)
                continue
            entry = asdict(read_shard_info(shard_path(out_dir, name)))
            scan.adopted.append(name)
        elif entry.get("bytes") not in (None, size):
            why = f"its size is {size:,} bytes, {entry['bytes']:,} were committed"
            scan.damaged.append((name, why))
            continue
        scan.shards.append(entry)
        scan.done.update(entry["positions"])
    scan.missing = sorted(set(listed) - set(sizes))
    return scan


def _legacy_note(out_dir: Path, legacy: Path) -> str:
    """The refusal of an output folder written by an earlier batchgen, naming that version."""
    made_by = None
    for path in sorted(out_dir.glob("part-*.parquet"))[:1]:
        made_by = (read_shard_metadata(path) or {}).get("batchgen")
    try:
        version = json.loads(legacy.read_text()).get("version", 1)
    except (OSError, json.JSONDecodeError):
        version = "unknown"
    how = f" (pip install 'batchgen=={made_by}')" if made_by else ""
    return (
        f"{out_dir} was written by batchgen {made_by or 'before 0.1.0'} in resume format "
        f"{version}, which this batchgen {__version__} (format {MANIFEST_VERSION}) cannot "
        f"resume; finish it with the version that made it{how}, or pass --overwrite to start "
        "it afresh here"
    )


@dataclass(slots=True)
class ResumeState:
    """What a starting run inherits from earlier runs of the same rank."""

    manifest: Manifest
    done: Positions  # input positions of the rank already committed
    next_seq: int
    resumed: bool
    notes: list[str]


class Checkpoint:
    """Owns one rank's manifest: opening (with the fingerprint check), commits and the final status."""

    def __init__(self, out_dir: Path, rank: int, num_ranks: int) -> None:
        self.out_dir = out_dir
        self.rank = rank
        self.num_ranks = num_ranks
        self.manifest: Manifest | None = None
        # The manifest's shards summed, kept up to date by each commit for its record.
        self.totals: RankTotals | None = None

    def open(
        self, fingerprint: dict[str, Any], total_prompts: int | None, overwrite: bool
    ) -> ResumeState:
        """Check the folder against this run's fingerprint and recover committed progress.

        Raises ResumeMismatch naming every changed setting unless `overwrite`, which removes the
        stale files instead. Must be called while holding the rank lock.
        """
        notes: list[str] = []
        scan = scan_rank(self.out_dir, self.rank, fingerprint)
        if overwrite:
            removed = self._overwrite(scan)
            if removed:
                notes.append(f"--overwrite removed {removed}")
            scan = scan_rank(self.out_dir, self.rank, fingerprint)
        else:
            self._refuse(scan)
        claim_job_record(self.out_dir, fingerprint)
        notes += self._remove_strays(scan)
        manifest = scan.manifest or Manifest(
            rank=self.rank,
            num_ranks=self.num_ranks,
            fingerprint=fingerprint,
            started_at=time.time(),
        )
        manifest.shards = sorted(scan.shards, key=lambda s: s["file"])
        for name in scan.adopted:
            rows = next(s["rows"] for s in scan.shards if s["file"] == name)
            notes.append(f"adopted {name} ({rows} rows), committed just before a crash")
        if scan.missing:
            manifest.status = "running"
            notes.append(
                f"{len(scan.missing)} shard(s) listed in the manifest are gone "
                f"({', '.join(scan.missing)}); their rows will be generated again"
            )
        manifest.fingerprint = fingerprint
        manifest.total_prompts = total_prompts
        manifest.host, manifest.pid = socket.gethostname(), os.getpid()
        seqs = [shard_seq(s["file"]) for s in manifest.shards]
        self.manifest = manifest
        self.totals = None
        return ResumeState(
            manifest=manifest,
            done=scan.done,
            next_seq=max(seqs, default=-1) + 1,
            resumed=scan.manifest is not None,
            notes=notes,
        )

    def _remove_strays(self, scan: RankScan) -> list[str]:
        """Remove what crashed writes of this rank left (temporary files; on a store, uploads no
        record names); a note for each. Only this rank's: other ranks' temporary files may belong
        to their live writers."""
        notes = []
        strays = (
            []
            if is_store(self.out_dir)
            else [
                *temp_files(self.out_dir, self.rank),
                *manifest_path(self.out_dir, self.rank).glob(".tmp-*"),
            ]
        )
        for stray in sorted(strays):
            stray.unlink(missing_ok=True)
            notes.append(f"removed an unfinished temporary file from a crash: {stray.name}")
        for name in scan.unlisted:
            shard_path(self.out_dir, name).unlink(missing_ok=True)
            notes.append(f"removed {name}, an upload no commit record names (cut off by a crash)")
        return notes

    def _refuse(self, scan: RankScan) -> None:
        """Raise the refusal a scan calls for, if any, in the words a user acts on."""
        out = self.out_dir
        if scan.other_run and not scan.changed:
            raise ResumeMismatch(
                f"{out} holds a run with different settings:\n  "
                + "\n  ".join(scan.other_run)
                + "\nuse another --output, or pass --overwrite to remove the other run's files"
            )
        if scan.legacy:
            raise ResumeMismatch(scan.legacy)
        if scan.changed:
            raise ResumeMismatch(
                f"{out} holds an earlier run with different settings:\n  "
                + "\n  ".join(scan.changed)
                + "\nrerun with the same settings to resume it, pass --overwrite to start "
                "afresh, or choose another --output"
            )
        for name in scan.foreign:
            raise ResumeMismatch(
                f"{shard_path(out, name)} is not a shard of this run; move it away, or pass "
                "--overwrite to start afresh"
            )
        for name, why in scan.damaged:
            raise BatchgenError(
                f"{shard_path(out, name)} is committed but unreadable ({why}); delete it and rerun to "
                "generate its rows again"
            )

    def _overwrite(self, scan: RankScan) -> str:
        """--overwrite: this rank's files, or the whole other run's when the folder holds one."""
        if scan.other_run or scan.legacy:
            return remove_run(self.out_dir, keep_rank=self.rank)
        return _remove_ranks(self.out_dir, {self.rank})

    def commit(self, info: ShardInfo) -> None:
        """Record a published shard: one new commit record, whatever the shard count, carrying
        the rank's running totals (what `batchgen status` reads instead of every record)."""
        assert self.manifest is not None
        if self.totals is None:  # once a run: the shards it resumed from
            self.totals = RankTotals.of(self.manifest.shards)
        entry = asdict(info)
        self.totals.add(entry)
        self.manifest.record_commit(self.out_dir, entry, self.totals)

    def set_status(self, status: str, report: dict[str, Any] | None = None) -> None:
        assert self.manifest is not None
        self.manifest.status = status
        if report is not None:
            self.manifest.report = report
        self.manifest.save(self.out_dir)


@dataclass(slots=True)
class CommittedPreview:
    """What a run of one rank would find in its output folder, read without taking the lock and
    changing nothing (`batchgen plan`): the shards and positions it would keep, or why it would
    be refused."""

    manifest: Manifest | None
    shards: list[dict[str, Any]]  # manifest entries of the shards a resume keeps or adopts
    done: Positions
    refused: list[str]  # each one reason a run with this fingerprint would be refused


def preview_resume(out_dir: Path, rank: int, fingerprint: dict[str, Any]) -> CommittedPreview:
    """What a resume of `rank` would keep, by the rules of `Checkpoint.open` (`scan_rank`)."""
    scan = scan_rank(out_dir, rank, fingerprint)
    refused = scan.refusals(out_dir)
    if refused:
        return CommittedPreview(scan.manifest, [], Positions(), refused)
    return CommittedPreview(scan.manifest, scan.shards, scan.done, [])
