"""Parquet shard output: file naming, the explicit Arrow schema and the atomic commit.

A shard is written under a hidden temporary name, flushed to disk, then renamed; readers
(pyarrow, pandas, DuckDB, `datasets`) see a shard complete or not at all, because they skip
names starting with '.' and a rename is atomic.

On an object store (OUT a `StorePath`, pipeline/storage/outpath.py) there is no rename: a shard
is encoded in memory and uploaded once, by one PUT (multipart when large), under a name no other
attempt uses (`part-RRRRR-SSSSSS-<attempt>.parquet`); an object appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import structured
from pipeline.errors import BatchgenError, storage_reason
from pipeline.positions import Positions
from pipeline.records import ResultRow
from pipeline.reuse.index import write_key_index
from pipeline.reuse.keys import KEY_BYTES
from pipeline.storage.outpath import is_store, parquet_source
from pipeline.storage.stateio import put_object

log = logging.getLogger("batchgen")

_TOKEN = pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())])
# One position of a completion or prompt: the token, its logprob and the top-k alternatives.
LOGPROB_ENTRY = pa.struct([*_TOKEN, pa.field("top", pa.list_(_TOKEN))])
# Columns present only in runs that ask for them, with the sampling keys that ask.
OPTIONAL_COLUMNS: dict[str, tuple[pa.DataType, tuple[str, ...]]] = {
    "parsed_ok": (
        pa.bool_(),
        ("json_schema", "choice", "regex", "grammar", "json_schema_column", "sampling_column"),
    ),
    "logprobs": (pa.list_(LOGPROB_ENTRY), ("logprobs", "sampling_column")),
    "cumulative_logprob": (pa.float64(), ("logprobs", "sampling_column")),
    "prompt_logprobs": (pa.list_(LOGPROB_ENTRY), ("prompt_logprobs", "sampling_column")),
    "sampling": (pa.string(), ("sampling_column",)),
    "adapter": (pa.string(), ("lora",)),
    "reasoning": (pa.string(), ("reasoning_parser",)),
    "reasoning_tokens": (pa.int32(), ("reasoning_parser",)),
    "reasoning_ended": (pa.bool_(), ("reasoning_parser",)),
}
RESERVED_COLUMNS = (
    "id",
    "sample_index",
    "text",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "error",
    "request_key",
    "reused_from",
    "prompt",
    *OPTIONAL_COLUMNS,
)
METADATA_KEY = b"batchgen"
SHARD_KEY = b"batchgen_shard"  # the shard's own ShardInfo (positions, counts), for adoption
# An object-store shard's name carries its attempt (8 hex digits): no two writers share a name.
SHARD_RE = re.compile(r"^part-(\d{5})-(\d{6})(?:-[0-9a-f]{8})?\.parquet$")
RANK_DIR_RE = re.compile(r"^rank-(\d{5})$")
TMP_PREFIX = ".tmp-"  # readers skip names that start with '.'


def shard_name(rank: int, seq: int, attempt: str = "") -> str:
    """The file name of a rank's seq-th shard; zero-padded so that names sort. `attempt` (an
    object store's writer) makes it a name no other attempt uses."""
    return f"part-{rank:05d}-{seq:06d}{'-' + attempt if attempt else ''}.parquet"


def shard_seq(name: str) -> int:
    """The seq of a shard file name made by `shard_name`."""
    match = SHARD_RE.match(name)
    if match is None:
        raise ValueError(f"{name} is not a shard file name")
    return int(match.group(2))


def rank_dir(out_dir: Path, rank: int) -> Path:
    """The folder of one rank's shards: OUT/rank-00003/ (readers that recurse see them all)."""
    return out_dir / f"rank-{rank:05d}"


def shard_path(out_dir: Path, name: str) -> Path:
    """Where the shard file `name` (made by `shard_name`) lies in `out_dir`."""
    match = SHARD_RE.match(name)
    if match is None:
        raise ValueError(f"{name} is not a shard file name")
    return rank_dir(out_dir, int(match.group(1))) / name


def list_names(folder: Path) -> list[str]:
    """The names in `folder` (a local folder or an object-store prefix), sorted; [] if none."""
    if is_store(folder):
        return [p.name for p in folder.iterdir()]
    try:
        return sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []


def output_ranks(out_dir: Path) -> list[int]:
    """The ranks that have a shard folder in `out_dir`, sorted."""
    names = list_names(out_dir)
    return sorted(int(m.group(1)) for n in names if (m := RANK_DIR_RE.match(n)))


def shard_files(out_dir: Path, rank: int | None = None) -> list[Path]:
    """Shard files on disk in `out_dir` (of one rank: one listing of its folder; or of all),
    sorted by name. The committed ones are those its manifest lists (`Manifest.load`): a file
    here that it does not list was renamed just before a crash, and the next run adopts it."""
    if rank is None:
        return [p for r in output_ranks(out_dir) for p in shard_files(out_dir, r)]
    folder = rank_dir(out_dir, rank)
    if is_store(folder):  # the listing's sizes and times come along (no request per shard)
        return [p for p in folder.iterdir() if SHARD_RE.match(p.name)]
    return [folder / n for n in list_names(folder) if SHARD_RE.match(n)]


def temp_files(out_dir: Path, rank: int) -> list[Path]:
    """Temporary files of one rank's unfinished shard writes (a crash leaves them; none on an
    object store, where an upload cut off leaves no object)."""
    if is_store(out_dir):
        return []
    return sorted(rank_dir(out_dir, rank).glob(f"{TMP_PREFIX}part-{rank:05d}-*"))


def temp_path(final: Path) -> Path:
    """Where a file is written before its atomic rename to `final` (unique per process)."""
    return final.with_name(f"{TMP_PREFIX}{final.name}.{os.getpid()}")


def create_file_once(path: Path, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists: a temporary file, fsync, then a hard link,
    which never replaces a file, so of processes racing to create it one wins and the file is
    whole for every reader. Whether this call created it."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{threading.get_ident()}")
    created = False
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
            created = True
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return created


def stale_temp_paths(final: Path) -> list[Path]:
    """`temp_path`s of `final` left by any process (a crash between write and rename)."""
    return sorted(final.parent.glob(f"{TMP_PREFIX}{final.name}.*"))


def output_schema(
    keep_prompt: bool, keep_fields: list[pa.Field], asks: Iterable[str] = ()
) -> pa.Schema:
    """The explicit schema of every shard of a run; `asks` (the keys of the run's resolved
    sampling record, plus "lora" and "reasoning_parser" when used) decides which optional
    columns it has."""
    asks = set(asks)
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("error", pa.string()),
        # The request's digest (pipeline.reuse.keys), and the earlier shard a --reuse run
        # took the row's outputs from (null: generated by this run).
        pa.field("request_key", pa.binary(KEY_BYTES)),
        pa.field("reused_from", pa.string()),
    ]
    if keep_prompt:
        fields.append(pa.field("prompt", pa.string()))
    for name, (kind, keys) in OPTIONAL_COLUMNS.items():
        if asks & set(keys):
            fields.append(pa.field(name, kind))
    return pa.schema(fields + [f.with_nullable(True) for f in keep_fields])


@dataclass(slots=True)
class ShardInfo:
    """What the manifest records about one committed shard."""

    file: str
    rows: int
    prompts: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    finish_reasons: dict[str, int]
    # When it was committed (Unix seconds) and how long its run had been generating then, for
    # progress and throughput over time (`batchgen report`); None in manifests written before
    # they were recorded. An adopted shard's commit time is its file's modification time.
    committed_at: float | None = None
    generate_seconds: float | None = None
    # The input positions (PromptRow.seq) of its prompts as [start, stop) ranges: what resume
    # skips. A few ranges a shard, since the engine finishes rows nearly in input order.
    positions: list[list[int]] = field(default_factory=list)
    bytes: int | None = None  # the file's size, checked on resume without reading the file

    @classmethod
    def of(cls, file: str, rows: Iterable[ResultRow]) -> ShardInfo:
        """Counts over a shard's rows."""
        info = cls(file, 0, 0, 0, 0, 0, {})
        for r in rows:
            info.rows += 1
            error = r.error is not None
            if r.sample_index == 0:
                info.prompts += 1
                if not error:
                    info.prompt_tokens += r.prompt_tokens or 0
            info.errors += error
            info.completion_tokens += r.completion_tokens or 0
            key = "error" if error else r.finish_reason
            info.finish_reasons[key] = info.finish_reasons.get(key, 0) + 1
        return info


def read_shard_info(path: Path) -> ShardInfo:
    """The manifest entry of a committed shard file, as its footer records it (one small read
    at the end of the file), with its file's time and size."""
    raw = (pq.read_schema(parquet_source(path)).metadata or {}).get(SHARD_KEY)
    if raw is None:
        raise BatchgenError(f"{path} records no shard entry; it was not written by this batchgen")
    info = ShardInfo(**json.loads(raw))
    stat = path.stat()
    info.file, info.bytes = path.name, stat.st_size
    info.committed_at = round(stat.st_mtime, 3)
    return info


class ParquetShardWriter:
    """Writes one rank's shards into the output folder, each committed atomically."""

    def __init__(
        self, out_dir: Path, rank: int, schema: pa.Schema, metadata: dict[str, Any]
    ) -> None:
        self.out_dir = out_dir
        self.rank = rank
        self.schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        # On an object store, this writer's shard names carry an attempt of their own.
        self.attempt = os.urandom(4).hex() if is_store(out_dir) else ""

    def table(self, rows: list[ResultRow]) -> pa.Table:
        columns: dict[str, list[Any]] = {
            "id": [r.id for r in rows],
            "sample_index": [r.sample_index for r in rows],
            "text": [r.text for r in rows],
            "finish_reason": [r.finish_reason for r in rows],
            "prompt_tokens": [r.prompt_tokens for r in rows],
            "completion_tokens": [r.completion_tokens for r in rows],
            "error": [r.error for r in rows],
            "request_key": [r.request_key for r in rows],
            "reused_from": [r.reused_from for r in rows],
        }
        for f in self.schema:
            if f.name == "prompt":
                columns["prompt"] = [r.prompt for r in rows]
            elif f.name == "parsed_ok":
                columns["parsed_ok"] = [_parsed_ok(r) for r in rows]
            elif f.name in OPTIONAL_COLUMNS:
                columns[f.name] = [getattr(r, f.name) for r in rows]
            elif f.name not in columns:
                columns[f.name] = [r.passthrough.get(f.name) for r in rows]
        arrays = [pa.array(columns[f.name], type=f.type) for f in self.schema]
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def write(self, rows: list[ResultRow], seq: int) -> ShardInfo:
        """Write, flush and rename one shard; the shard exists complete or not at all."""
        final = rank_dir(self.out_dir, self.rank) / shard_name(self.rank, seq, self.attempt)
        if is_store(final):
            return self._write_object(rows, final)
        if not final.parent.is_dir():
            final.parent.mkdir(exist_ok=True)
            fsync_dir(self.out_dir)
        tmp = temp_path(final)
        rows = sorted(rows, key=lambda r: (r.seq, r.sample_index))  # input order within a shard
        info = ShardInfo.of(final.name, rows)
        info.positions = Positions.of(r.seq for r in rows).to_list()
        try:
            self._write_temp(rows, tmp, info)
            info.bytes = tmp.stat().st_size
            write_key_index(final, rows)  # before the shard: a committed shard has its index
            self._publish(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(final.parent)
        return info

    def _write_object(self, rows: list[ResultRow], final: Any) -> ShardInfo:
        """An object store's commit: the shard encoded in memory (the upload buffer: one
        shard's compressed bytes), then uploaded once under its unique name. No key index:
        --reuse reads local folders only."""
        rows = sorted(rows, key=lambda r: (r.seq, r.sample_index))
        info = ShardInfo.of(final.name, rows)
        info.positions = Positions.of(r.seq for r in rows).to_list()
        sink = pa.BufferOutputStream()
        self._encode(rows, info, sink)
        data = sink.getvalue()
        info.bytes = data.size
        self._publish(data, final)
        return info

    # The two steps of a commit; the kill tests wrap each to stop a process between them.

    def _write_temp(self, rows: list[ResultRow], tmp: Path, info: ShardInfo) -> None:
        with open(tmp, "wb") as f:
            self._encode(rows, info, f)
            f.flush()
            os.fsync(f.fileno())

    def _encode(self, rows: list[ResultRow], info: ShardInfo, sink: Any) -> None:
        table = self.table(rows)
        entry = json.dumps(asdict(info), sort_keys=True).encode()
        table = table.replace_schema_metadata({**table.schema.metadata, SHARD_KEY: entry})
        pq.write_table(table, sink, compression="zstd")

    def _publish(self, tmp: Any, final: Any) -> None:
        """Make the shard visible: a rename locally, the upload of its bytes on a store."""
        if is_store(final):
            put_object(final, tmp)
            return
        os.replace(tmp, final)


def _parsed_ok(row: ResultRow) -> bool | None:
    if row.constraint is None or row.error is not None:
        return None
    return structured.parsed_ok(*row.constraint, row.text, row.finish_reason)


def prepare_output_dir(out_dir: Path, warn: bool = True) -> None:
    """Create the output folder and prove it writable before any other work (on an object
    store: endpoint, credentials, bucket and write permission, each in one line; with `warn`,
    the store's one warning, which --data-parallel's launcher gives for all its ranks)."""
    if is_store(out_dir):
        from pipeline.storage.preflight import preflight
        from pipeline.storage.stateio import check_then_write_warning

        preflight(out_dir.store.loc)
        warning = check_then_write_warning(out_dir) if warn else None
        if warning:
            log.warning(warning)
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".batchgen-write-test-{os.getpid()}-{int(time.time() * 1e6)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason, fix = storage_reason(exc, out_dir)
        raise BatchgenError(
            f"--output {out_dir}: cannot write there ({reason}); nothing in it was changed; "
            f"{fix} and rerun, or choose another --output"
        ) from exc


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_shard_metadata(path: Path) -> dict[str, Any] | None:
    """The batchgen metadata of a shard, or None if the file is not a readable batchgen shard."""
    try:
        meta = pq.read_schema(parquet_source(path)).metadata or {}
    except (pa.ArrowInvalid, OSError):
        return None
    raw = meta.get(METADATA_KEY)
    return json.loads(raw) if raw else None
