"""`batchgen export OUT --openai-batch results.jsonl`: a run made from a batch request file
(--openai-batch) written back as OpenAI's batch output format, line for line, in input order.

Committed shards are read through `pipeline.sinks.shard_files` only. Each shard holds its rows in
input order (the writer sorts them), but shards overlap: a long request is committed after
shorter ones read after it. So the shards are merged by each row's input position, a shard being
opened only once the merge reaches its first position (read from its footer's statistics):
memory holds one record batch per overlapping shard, a few per rank, never the whole output.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow.parquet as pq

from pipeline.batchfile import COMPLETIONS_URL
from pipeline.errors import BatchgenError
from pipeline.sinks import read_shard_metadata, shard_files
from pipeline.sources.openai_batch import MODEL_COLUMN, POSITION_COLUMN, URL_COLUMN
from pipeline.storage.outpath import parquet_source

_COLUMNS = ["id", "sample_index", "text", "finish_reason", "prompt_tokens", "completion_tokens"]
_COLUMNS += ["error", POSITION_COLUMN, URL_COLUMN, MODEL_COLUMN]
_NO_CUSTOM_ID = re.compile(r"^<.+ line \d+>$")
READ_ROWS = 1024


@dataclass(slots=True)
class ExportCounts:
    """What an export wrote."""

    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    missing: int = 0  # input requests not committed yet (an unfinished run)


def export_openai_batch(out_dir: Path, results: Path, errors: Path | None = None) -> ExportCounts:
    """Write OUT's committed rows as OpenAI batch output lines to `results` (and the failed
    requests to `errors` when given, as OpenAI splits them); each file appears whole or not
    at all."""
    files = shard_files(out_dir)
    if not files:
        raise BatchgenError(
            f"{out_dir}: no committed shards; run `batchgen run --openai-batch FILE --output "
            f"{out_dir}` first"
        )
    meta = read_shard_metadata(files[0]) or {}
    if POSITION_COLUMN not in pq.read_schema(parquet_source(files[0])).names:
        raise BatchgenError(
            f"{out_dir} was not made from a batch request file; export --openai-batch needs a "
            "run made with `batchgen run --openai-batch FILE`"
        )
    total = _input_rows(meta)
    default_model = Path(meta.get("model") or "model").name
    counts = ExportCounts()
    with _AtomicFile(results) as res, _AtomicFile(errors) as err:
        expected = 0
        for rows, created in _requests(files):
            position = rows[0][POSITION_COLUMN]
            counts.missing += position - expected
            expected = position + 1
            line, failed = _output_line(rows, created, default_model)
            counts.requests += 1
            counts.failed += failed
            counts.succeeded += not failed
            (err if failed and errors is not None else res).write(line + "\n")
    if total is not None:
        counts.missing += total - expected
    return counts


def _input_rows(meta: dict[str, Any]) -> int | None:
    ident = meta.get("fingerprint", {}).get("input", {})
    files = ident.get("files")
    if isinstance(files, list):  # an earlier batchgen's fingerprint listed every file
        return sum(f[2] for f in files)
    return ident.get("rows")


def _requests(files: list[Path]) -> Iterator[tuple[list[dict[str, Any]], int]]:
    """Each request's rows (one per sample), in input order, with its shard's commit time."""
    group: list[dict[str, Any]] = []
    group_created = 0
    for row, created in _merged(files):
        if group and row[POSITION_COLUMN] != group[0][POSITION_COLUMN]:
            yield group, group_created
            group = []
        group.append(row)
        group_created = created
    if group:
        yield group, group_created


def _merged(files: list[Path]) -> Iterator[tuple[dict[str, Any], int]]:
    """Rows of all shards by (position, sample index); a shard is opened when the merge
    reaches its first position."""
    pending = sorted((_first_position(p), i, p) for i, p in enumerate(files))
    pending.reverse()  # popped from the end
    heap: list[tuple[int, int, int, dict[str, Any], Iterator[dict[str, Any]], int]] = []
    while pending or heap:
        while pending and (not heap or pending[-1][0] <= heap[0][0]):
            _, i, path = pending.pop()
            rows, created = _shard_rows(path), int(path.stat().st_mtime)
            first = next(rows, None)
            if first is not None:
                key = (first[POSITION_COLUMN], first["sample_index"])
                heapq.heappush(heap, (*key, i, first, rows, created))
        if not heap:
            continue
        _, _, i, row, rows, created = heapq.heappop(heap)
        yield row, created
        nxt = next(rows, None)
        if nxt is not None:
            key = (nxt[POSITION_COLUMN], nxt["sample_index"])
            heapq.heappush(heap, (*key, i, nxt, rows, created))


def _first_position(path: Path) -> int:
    """A shard's smallest input position, from its footer's statistics where present."""
    meta = pq.ParquetFile(parquet_source(path)).metadata
    if meta.num_row_groups == 0:
        return -1
    group = meta.row_group(0)  # rows are sorted within a shard: its first group has the min
    for j in range(group.num_columns):
        chunk = group.column(j)
        if chunk.path_in_schema == POSITION_COLUMN:
            stats = chunk.statistics
            if stats is not None and stats.has_min_max:
                return int(stats.min)
    return min(pq.read_table(parquet_source(path), columns=[POSITION_COLUMN]).column(0).to_pylist())


def _shard_rows(path: Path) -> Iterator[dict[str, Any]]:
    with pq.ParquetFile(parquet_source(path)) as pf:
        columns = [c for c in (*_COLUMNS, "logprobs") if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=READ_ROWS, columns=columns):
            yield from batch.to_pylist()


def _output_line(rows: list[dict[str, Any]], created: int, default_model: str) -> tuple[str, bool]:
    """One request's OpenAI batch output line, and whether it failed."""
    first = rows[0]
    custom_id = first["id"]
    digest = hashlib.blake2b(custom_id.encode(), digest_size=12).hexdigest()
    if first["url"] is None and _NO_CUSTOM_ID.match(custom_id):
        custom_id = None  # the line had no custom_id: it is named in the error message
    error = next((r["error"] for r in rows if r["error"] is not None), None)
    if error is not None:
        body: dict[str, Any] = {
            "error": {
                "message": error,
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
        status = 400
    else:
        body = _completion_body(rows, created, first[MODEL_COLUMN] or default_model, digest)
        status = 200
    line = {
        "id": f"batch_req_{digest}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"req_{digest}", "body": body},
        "error": None,
    }
    return json.dumps(line, ensure_ascii=False), error is not None


def _completion_body(
    rows: list[dict[str, Any]], created: int, model: str, digest: str
) -> dict[str, Any]:
    """A `chat.completion` (chat and Anthropic lines) or `text_completion` object."""
    text_completion = rows[0][URL_COLUMN] == COMPLETIONS_URL
    choices = []
    for r in rows:
        choice: dict[str, Any] = {"index": r["sample_index"], "finish_reason": r["finish_reason"]}
        entries = r.get("logprobs")
        if text_completion:
            choice["text"] = r["text"]
            choice["logprobs"] = None if entries is None else _completion_logprobs(entries)
        else:
            choice["message"] = {"role": "assistant", "content": r["text"]}
            choice["logprobs"] = None if entries is None else _chat_logprobs(entries)
        choices.append(choice)
    prompt_tokens = rows[0]["prompt_tokens"] or 0
    completion_tokens = sum(r["completion_tokens"] or 0 for r in rows)
    return {
        "id": f"{'cmpl' if text_completion else 'chatcmpl'}-{digest}",
        "object": "text_completion" if text_completion else "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    def token(e: dict[str, Any]) -> dict[str, Any]:
        text = e["token"] or ""
        return {"token": text, "logprob": e["logprob"], "bytes": list(text.encode())}

    content = [{**token(e), "top_logprobs": [token(t) for t in e["top"] or []]} for e in entries]
    return {"content": content, "refusal": None}


def _completion_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = [e["token"] or "" for e in entries]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"] or "": t["logprob"] for t in e["top"] or []} for e in entries],
        "text_offset": offsets,
    }


class _AtomicFile:
    """A file written under a temporary name and renamed into place on success; a no-op
    writer for None."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.tmp = None if path is None else path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.fh: IO[str] | None = None

    def __enter__(self) -> _AtomicFile:
        if self.tmp is not None:
            try:
                self.fh = open(self.tmp, "w", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise BatchgenError(
                    f"{self.path}: cannot write there ({exc.strerror}); choose another path"
                ) from exc
        return self

    def write(self, text: str) -> None:
        if self.fh is not None:
            self.fh.write(text)

    def __exit__(self, kind: Any, *_: Any) -> None:
        if self.fh is None:
            return
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        assert self.tmp is not None and self.path is not None
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
