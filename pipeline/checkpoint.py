"""Resume state: the per-rank manifest, the config fingerprint and the rank lock.

Layout of an output folder (the state folder is hidden, so readers see only shards):

    OUT/part-00000-000000.parquet ...     committed shards, rank 0
    OUT/.batchgen/rank-00000.json          manifest: fingerprint, shards, status, report
    OUT/.batchgen/rank-00000.lock          held (lockf) while a process writes rank 0

Commit order is shard rename, then manifest. A crash between the two leaves a complete shard
the manifest does not list; the next run adopts it after checking its embedded fingerprint, so
no row is lost or written twice. Temporary files of a crashed write are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.adapters import Adapter
from pipeline.config import RunConfig
from pipeline.errors import BatchgenError, OutputLocked, ResumeMismatch
from pipeline.models import model_signature
from pipeline.sinks import (
    SHARD_RE,
    ShardInfo,
    fsync_dir,
    read_ids,
    read_shard_info,
    read_shard_metadata,
    shard_files,
    shard_seq,
    stale_temp_paths,
    temp_files,
    temp_path,
)

STATE_DIR = ".batchgen"
MANIFEST_VERSION = 2
# Manifest keys renamed in version 2, read from older manifests under their new names.
_RENAMED_KEYS = {"num_shards": "num_ranks", "total_rows": "total_prompts"}
# Fingerprint fields that name the rank rather than the run; every other field must agree
# across all ranks writing one output folder.
RANK_FIELDS = ("shard_index",)
# How long a starting run retries a taken rank lock. `batchgen status` takes it (shared) for a
# few microseconds to see whether a process holds it; a run starting then must not give up.
LOCK_RETRY_SECONDS = 1.0
# Lock files this process holds. POSIX locks belong to the process and closing any descriptor
# of the file drops them, so a probe from the holding process must not open and close it.
_HELD_LOCKS: set[Path] = set()


def manifest_path(out_dir: Path, rank: int) -> Path:
    return out_dir / STATE_DIR / f"rank-{rank:05d}.json"


def engine_log_path(out_dir: Path, rank: int) -> Path:
    """Where a rank's engine writes its own log (vLLM's lines), appended across resumes."""
    return out_dir / STATE_DIR / "logs" / f"engine-rank-{rank:05d}.log"


def lock_path(out_dir: Path, rank: int) -> Path:
    return out_dir / STATE_DIR / f"rank-{rank:05d}.lock"


@dataclass(slots=True)
class Manifest:
    """One rank's committed progress. Written atomically after every shard commit."""

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
    def load(cls, path: Path) -> Manifest | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError) as exc:
            raise BatchgenError(
                f"{path} is unreadable ({exc}); it is batchgen's resume state: restore it, or "
                "pass --overwrite to start this rank afresh"
            ) from exc
        data = {_RENAMED_KEYS.get(k, k): v for k, v in data.items()}
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["version"] = MANIFEST_VERSION
        return cls(**known)

    def save(self, out_dir: Path) -> None:
        self.updated_at = time.time()
        path = manifest_path(out_dir, self.rank)
        tmp = temp_path(path)
        try:
            with open(tmp, "w") as f:
                json.dump(asdict(self), f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            # A full disk fails here; the last good manifest stays in place.
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def run_fingerprint(
    cfg: RunConfig,
    model: str,
    input_identity: dict[str, Any],
    chat_template: str | None,
    sampling: dict[str, Any],
    adapters: list[Adapter] = (),
    server: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every setting that changes what a row's output is. A resume must match it exactly.

    The keys are stored in manifests and shards; renaming one makes every earlier run
    unresumable, so they keep their first spelling (`num_shards` is the rank count). A --server
    run adds `server` (the served model, the prompt form and the tokenizer: see
    ServerEngine.settings); the server decides model_impl, dtype and context, so those are null.
    """
    in_process = server is None
    fingerprint = {
        "model": model,
        "model_files": model_signature(model),
        "model_impl": cfg.engine.model_impl if in_process else None,
        "dtype": cfg.engine.dtype if in_process else None,
        "max_model_len": cfg.engine.max_model_len,
        "engine": cfg.engine.backend if in_process else "server",
        "prompt": {
            "prompt_column": cfg.prompt.prompt_column,
            "template": cfg.prompt.template,
            "messages_column": cfg.prompt.messages_column,
            "chat": cfg.prompt.chat,
            "system_prompt": cfg.prompt.system_prompt,
        },
        "chat_template_sha256": hashlib.sha256(chat_template.encode()).hexdigest()[:16]
        if chat_template
        else None,
        "sampling": sampling,
        "seed": cfg.engine.seed,
        "input": input_identity,
        "id_column": cfg.source.id_column,
        "columns": {
            "keep_prompt": cfg.output.keep_prompt,
            "keep_columns": list(cfg.output.keep_columns),
        },
        "num_shards": cfg.num_ranks,
        "shard_index": cfg.rank,
    }
    # Recorded only when used, so the fingerprints of runs that never used them are unchanged.
    if cfg.prompt.chat_template_kwargs:
        fingerprint["prompt"]["chat_template_kwargs"] = dict(cfg.prompt.chat_template_kwargs)
    if adapters:
        fingerprint["adapters"] = {a.name: a.sha256 for a in adapters}
        fingerprint["lora_column"] = cfg.lora_column
    if cfg.engine.reasoning_parser:
        fingerprint["reasoning_parser"] = cfg.engine.reasoning_parser
    if cfg.engine.batch_invariant:
        fingerprint["batch_invariant"] = True
    # Speculative decoding changes what is sampled for a given seed (greedy texts only up to
    # floating-point effects): a resume must keep it, unlike the engine's batch limits.
    speculative = dict(cfg.engine.engine_args).get("speculative_config")
    if speculative is not None:
        fingerprint["speculative_config"] = speculative
    if server is not None:
        fingerprint["server"] = server
    return fingerprint


def diff_fingerprints(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable `field: old -> new` lines for every setting that differs."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(key, _ABSENT), flat_new.get(key, _ABSENT)
        if a != b:
            lines.append(f"{key}: {_short(a)} -> {_short(b)}")
    return lines


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True) if isinstance(v, list) else v
    return out


_ABSENT = object()


def _short(value: Any, limit: int = 120) -> str:
    if value is _ABSENT or value is None:
        return "(not set)"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RankLock:
    """An exclusive lock on one rank of an output folder.

    POSIX record locks (lockf) are released by the kernel when their process dies, however it
    dies, so a lock left by a killed run never blocks the next; they also work on NFS.
    """

    def __init__(self, out_dir: Path, rank: int) -> None:
        self.path = lock_path(out_dir, rank)
        self.rank = rank
        self._file = None

    def acquire(self) -> RankLock:
        """Take the lock, or raise OutputLocked naming the holder (OSError if it cannot be made)."""
        key = self.path.resolve()
        if key in _HELD_LOCKS:  # a second run in this process: lockf would let it through
            raise self._locked(f"this process (pid {os.getpid()})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
            f"rank {self.rank} of {self.path.parent.parent} is being written by {holder}; "
            "wait for it to finish or stop it (a killed process releases the lock at once), "
            "or write to another --output"
        )

    def release(self) -> None:
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
    path = lock_path(out_dir, rank)
    if path.resolve() in _HELD_LOCKS:
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


def recorded_ranks(out_dir: Path) -> dict[int, int]:
    """{rank: the rank count its manifest records} for every rank manifest in `out_dir`."""
    found = {}
    for path in sorted((out_dir / STATE_DIR).glob("rank-*.json")):
        manifest = Manifest.load(path)
        if manifest is not None:
            found[manifest.rank] = manifest.num_ranks
    return found


def remove_run(out_dir: Path) -> str:
    """--overwrite of a whole run at once (what `--data-parallel` does before starting its
    ranks, which would otherwise race to remove each other's old files): every rank's shards,
    temporary files and manifests. Refuses, removing nothing, while any rank's lock is held.
    What was removed, in words ("" if nothing)."""
    state = out_dir / STATE_DIR
    ranks = {int(m.group(1)) for p in shard_files(out_dir) if (m := SHARD_RE.match(p.name))}
    ranks |= {
        int(p.stem.removeprefix("rank-"))
        for pattern in ("rank-*.json", "rank-*.lock")
        for p in state.glob(pattern)
        if p.stem.removeprefix("rank-").isdigit()
    }
    for rank in sorted(ranks):
        holder = lock_holder(out_dir, rank)
        if holder is not None:
            raise OutputLocked(
                f"--overwrite would remove rank {rank} of {out_dir}, which {holder} is writing "
                "now; stop it first (a killed process releases its lock at once), or write to "
                "another --output"
            )
    return _remove_ranks(out_dir, ranks)


def _remove_ranks(out_dir: Path, ranks: set[int]) -> str:
    """Remove these ranks' shards, temporary files and manifests; what was removed, in words."""
    shards = manifests = 0
    for rank in sorted(ranks):
        for p in shard_files(out_dir, rank):
            p.unlink()
            shards += 1
        for p in temp_files(out_dir, rank):
            p.unlink()
        m = manifest_path(out_dir, rank)
        if m.exists():
            m.unlink()
            manifests += 1
    if not shards and not manifests:
        return ""
    return f"{shards} shard(s) and {manifests} manifest(s) of rank(s) {', '.join(map(str, sorted(ranks)))}"


@dataclass(slots=True)
class ResumeState:
    """What a starting run inherits from earlier runs of the same rank."""

    manifest: Manifest
    done_ids: set[str]
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

    def open(
        self, fingerprint: dict[str, Any], total_prompts: int | None, overwrite: bool
    ) -> ResumeState:
        """Check the folder against this run's fingerprint and recover committed progress.

        Raises ResumeMismatch naming every changed setting unless `overwrite`, which removes the
        stale files instead. Must be called while holding the rank lock.
        """
        notes: list[str] = []
        if overwrite:
            removed = self._remove_stale(fingerprint)
            if removed:
                notes.append(f"--overwrite removed {removed}")
        else:
            self._check_other_ranks(fingerprint)
        old = Manifest.load(manifest_path(self.out_dir, self.rank))
        if old is not None:
            changed = diff_fingerprints(old.fingerprint, fingerprint)
            if changed:
                raise ResumeMismatch(
                    f"{self.out_dir} holds an earlier run with different settings:\n  "
                    + "\n  ".join(changed)
                    + "\nrerun with the same settings to resume it, pass --overwrite to start "
                    "afresh, or choose another --output"
                )
        # Only this rank's: other ranks' temporary files may belong to their live writers.
        strays = [
            *temp_files(self.out_dir, self.rank),
            *stale_temp_paths(manifest_path(self.out_dir, self.rank)),
        ]
        for stray in sorted(strays):
            stray.unlink(missing_ok=True)
            notes.append(f"removed an unfinished temporary file from a crash: {stray.name}")
        manifest = old or Manifest(
            rank=self.rank,
            num_ranks=self.num_ranks,
            fingerprint=fingerprint,
            started_at=time.time(),
        )
        notes += self._reconcile(manifest, fingerprint)
        manifest.fingerprint = fingerprint
        manifest.total_prompts = total_prompts
        manifest.host, manifest.pid = socket.gethostname(), os.getpid()
        done_ids: set[str] = set()
        for shard in manifest.shards:
            path = self.out_dir / shard["file"]
            try:
                done_ids.update(read_ids(path))
            except (pa.ArrowException, OSError) as exc:
                raise BatchgenError(
                    f"{path} is committed but unreadable ({exc}); delete it and rerun to "
                    "generate its rows again"
                ) from exc
        seqs = [shard_seq(s["file"]) for s in manifest.shards]
        self.manifest = manifest
        return ResumeState(
            manifest=manifest,
            done_ids=done_ids,
            next_seq=max(seqs, default=-1) + 1,
            resumed=old is not None,
            notes=notes,
        )

    def _reconcile(self, manifest: Manifest, fingerprint: dict[str, Any]) -> list[str]:
        """Match the manifest to the shards on disk: adopt complete shards it missed (crash after
        rename, before the manifest write), forget ones that were deleted."""
        notes = []
        listed = {s["file"] for s in manifest.shards}
        on_disk = {p.name for p in shard_files(self.out_dir, self.rank)}
        for name in sorted(on_disk - listed):
            meta = read_shard_metadata(self.out_dir / name)
            if meta is None or diff_fingerprints(meta.get("fingerprint", {}), fingerprint):
                raise ResumeMismatch(
                    f"{self.out_dir / name} is not a shard of this run; move it away, or pass "
                    "--overwrite to start afresh"
                )
            info = read_shard_info(self.out_dir / name)
            manifest.shards.append(asdict(info))
            notes.append(f"adopted {name} ({info.rows} rows), committed just before a crash")
        missing = listed - on_disk
        if missing:
            manifest.shards = [s for s in manifest.shards if s["file"] not in missing]
            manifest.status = "running"
            notes.append(
                f"{len(missing)} shard(s) listed in the manifest are gone ({', '.join(sorted(missing))}); "
                "their rows will be generated again"
            )
        manifest.shards.sort(key=lambda s: s["file"])
        return notes

    def _check_other_ranks(self, fingerprint: dict[str, Any]) -> None:
        for path in sorted((self.out_dir / STATE_DIR).glob("rank-*.json")):
            other = Manifest.load(path)
            if other is None or other.rank == self.rank:
                continue
            changed = diff_fingerprints(_shared(other.fingerprint), _shared(fingerprint))
            if changed:
                raise ResumeMismatch(
                    f"{self.out_dir} holds rank {other.rank} of a run with different settings:\n  "
                    + "\n  ".join(changed)
                    + "\nuse another --output, or pass --overwrite to remove the other run's files"
                )

    def _remove_stale(self, fingerprint: dict[str, Any]) -> str:
        """Remove this rank's files and any other rank's files from a different run."""
        ranks = {self.rank}
        for path in (self.out_dir / STATE_DIR).glob("rank-*.json"):
            other = Manifest.load(path)
            if other is not None and diff_fingerprints(
                _shared(other.fingerprint), _shared(fingerprint)
            ):
                ranks.add(other.rank)
        # Another rank's lock held means its run is alive: deleting its files under it would
        # lose work that it then lists in a manifest pointing at nothing. Check all before
        # removing any, so a refusal leaves the folder as it was.
        for rank in sorted(ranks - {self.rank}):
            holder = lock_holder(self.out_dir, rank)
            if holder is not None:
                raise OutputLocked(
                    f"--overwrite would remove rank {rank} of {self.out_dir}, a run with other "
                    f"settings that {holder} is writing now; stop it first (a killed process "
                    "releases its lock at once), or write to another --output"
                )
        return _remove_ranks(self.out_dir, ranks)

    def commit(self, info: ShardInfo) -> None:
        assert self.manifest is not None
        self.manifest.shards.append(asdict(info))
        self.manifest.save(self.out_dir)

    def set_status(self, status: str, report: dict[str, Any] | None = None) -> None:
        assert self.manifest is not None
        self.manifest.status = status
        if report is not None:
            self.manifest.report = report
        self.manifest.save(self.out_dir)


def _shared(fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fingerprint.items() if k not in RANK_FIELDS}


@dataclass(slots=True)
class CommittedPreview:
    """What a run of one rank would find in its output folder, read without taking the lock and
    changing nothing (`batchgen plan`): the shards and ids it would keep, or why it would be
    refused."""

    manifest: Manifest | None
    shards: list[dict[str, Any]]  # manifest entries of the shards a resume keeps or adopts
    done_ids: set[str]
    refused: list[str]  # each one reason a run with this fingerprint would be refused


def preview_resume(out_dir: Path, rank: int, fingerprint: dict[str, Any]) -> CommittedPreview:
    """What a resume of `rank` would keep, by the rules of `Checkpoint.open`: the listed shards
    still on disk, plus complete shards of this run that it would adopt."""
    refused: list[str] = []
    for path in sorted((out_dir / STATE_DIR).glob("rank-*.json")):
        other = Manifest.load(path)
        if other is None or other.rank == rank:
            continue
        changed = diff_fingerprints(_shared(other.fingerprint), _shared(fingerprint))
        refused += [f"rank {other.rank}: {line}" for line in changed]
    manifest = Manifest.load(manifest_path(out_dir, rank))
    if manifest is not None:
        refused += [
            f"rank {rank}: {line}" for line in diff_fingerprints(manifest.fingerprint, fingerprint)
        ]
    if refused:
        return CommittedPreview(manifest, [], set(), refused)
    listed = {s["file"]: s for s in manifest.shards} if manifest is not None else {}
    shards: list[dict[str, Any]] = []
    done_ids: set[str] = set()
    for path in shard_files(out_dir, rank):
        try:
            if path.name in listed:
                shards.append(listed[path.name])
            else:
                meta = read_shard_metadata(path)
                if meta is None or diff_fingerprints(meta.get("fingerprint", {}), fingerprint):
                    refused.append(f"{path} is not a shard of this run")
                    continue
                shards.append(asdict(read_shard_info(path)))
            done_ids.update(read_ids(path))
        except (pa.ArrowException, OSError) as exc:
            refused.append(f"{path} is committed but unreadable ({exc})")
    return CommittedPreview(manifest, shards, done_ids, refused)
