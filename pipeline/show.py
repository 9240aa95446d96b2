"""`batchgen show OUT`: committed rows, laid out for a person to read.

It reads only committed shards (the visible `part-*.parquet` files: a shard is renamed into
place complete, so a running job's folder is safe to read) one at a time, filters them with
Arrow, and keeps at most the rows it will print (--limit, or a seeded --sample). --limit stops
reading at the shard that completes it (the committed row count then comes from the rank
manifests), so it costs a few shards at any job size; --sample reads every shard.
"""

from __future__ import annotations

import json
import random
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.checkpoint import STATE_DIR
from pipeline.errors import BatchgenError, ConfigError
from pipeline.sinks import RESERVED_COLUMNS, read_shard_metadata, shard_files
from pipeline.storage.outpath import parquet_source

LABEL_WIDTH = 9  # "prompt", "text", "error", kept columns: the label column of each row's block
_OPS = ("!=", "=")


@dataclass(frozen=True, slots=True)
class Condition:
    """One --where COLUMN=VALUE (or COLUMN!=VALUE)."""

    column: str
    op: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Condition:
        for op in _OPS:
            column, sep, value = text.partition(op)
            if sep and column:
                return cls(column.strip(), op, value)
        raise ConfigError(
            f"--where {text!r}: expected COLUMN=VALUE or COLUMN!=VALUE, e.g. "
            "--where finish_reason=length"
        )

    def __str__(self) -> str:
        return f"{self.column}{self.op}{self.value}"

    def mask(self, table: pa.Table) -> pa.ChunkedArray:
        if self.column not in table.column_names:
            raise ConfigError(
                f"--where {self}: no column {self.column!r}; the output's columns are: "
                f"{', '.join(table.column_names)}"
            )
        column = table[self.column]
        try:
            value = pa.scalar(self.value).cast(column.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ConfigError(
                f"--where {self}: {self.column!r} holds {column.type}, and {self.value!r} is not "
                "one"
            ) from exc
        if self.op == "=":
            return pc.fill_null(pc.equal(column, value), False)
        return pc.fill_null(pc.not_equal(column, value), True)  # a null differs from any value


@dataclass(slots=True)
class Selection:
    """The rows to print and what they were chosen from."""

    rows: list[dict[str, Any]]
    committed: int  # committed rows in the folder
    shards: int
    matched: int  # rows that pass the filters
    filters: list[str] = field(default_factory=list)
    n: int = 1  # samples per prompt, from the shards' metadata
    # --limit's rows were found before the last shard: the shards after were not read, so
    # `matched` counts only the shards read and `committed` comes from the rank manifests.
    stopped_early: bool = False


def select(
    out_dir: Path,
    where: tuple[str, ...] = (),
    errors: bool = False,
    ids: tuple[str, ...] = (),
    sample: int | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> Selection:
    """The committed rows of `out_dir` that pass every filter: all of them in output order, the
    first `limit`, or a seeded random `sample` (still printed in output order)."""
    if not out_dir.is_dir():
        raise BatchgenError(f"{out_dir}: no such folder; give the --output folder of a run")
    files = shard_files(out_dir)
    if not files and not (out_dir / STATE_DIR).is_dir():
        raise BatchgenError(
            f"{out_dir}: no batchgen run there (no rank-*/part-*.parquet shards and no {STATE_DIR}); "
            "give the --output folder of a run"
        )
    conditions = [Condition.parse(w) for w in where]
    filters = [str(c) for c in conditions]
    if errors:
        filters.append("error rows")
    if ids:
        filters.append("id " + " or ".join(ids))
    meta = read_shard_metadata(files[0]) if files else None
    sel = Selection([], 0, len(files), 0, filters, ((meta or {}).get("sampling") or {}).get("n", 1))
    rng = random.Random(seed)
    kept: list[tuple[int, dict[str, Any]]] = []  # (position among matches, row)
    for i, path in enumerate(files):
        if sample is None and limit is not None and len(kept) >= limit and i < len(files):
            sel.stopped_early = True  # at fleet size, --limit 5 reads one shard, not 10,000
            sel.committed = _manifest_rows(out_dir, sel.committed, files[i:])
            break
        table = pq.read_table(parquet_source(path))
        sel.committed += table.num_rows
        mask = pa.chunked_array([pa.array([True] * table.num_rows)])
        for condition in conditions:
            mask = pc.and_(mask, condition.mask(table))
        if errors:
            mask = pc.and_(mask, pc.is_valid(table["error"]))
        if ids:
            mask = pc.and_(mask, pc.is_in(table["id"], value_set=pa.array(list(ids))))
        matches = table.filter(mask)
        for row in matches.to_pylist():
            position = sel.matched
            sel.matched += 1
            if sample is not None:  # reservoir sampling: memory stays at `sample` rows
                if len(kept) < sample:
                    kept.append((position, row))
                else:
                    j = rng.randrange(position + 1)
                    if j < sample:
                        kept[j] = (position, row)
            elif limit is None or len(kept) < limit:
                kept.append((position, row))
    kept.sort(key=lambda item: item[0])
    sel.rows = [row for _, row in kept][:limit]
    return sel


def _manifest_rows(out_dir: Path, read: int, unread: list[Path]) -> int:
    """Committed rows of the folder without reading the unread shards: the rows read plus
    what the manifests of the unread shards' ranks record for them (a shard no manifest lists
    yet, committed just before a crash, counts by its footer)."""
    from pipeline.checkpoint import Manifest

    by_rank: dict[int, list[str]] = {}
    for path in unread:
        by_rank.setdefault(int(path.parent.name[5:]), []).append(path.name)
    for rank, names in by_rank.items():
        manifest = Manifest.load(out_dir, rank)
        listed = {s["file"]: s["rows"] for s in manifest.shards} if manifest else {}
        for name in names:
            rows = listed.get(name)
            if rows is None:
                rows = pq.ParquetFile(out_dir / f"rank-{rank:05d}" / name).metadata.num_rows
            read += rows
    return read


def render(sel: Selection, out_dir: Path, width: int) -> str:
    """The selection as text blocks wrapped to `width` columns, under a one-line summary."""
    width = max(width, 40)
    head = f"{out_dir}: {sel.committed:,} committed rows in {sel.shards:,} shard" + (
        "" if sel.shards == 1 else "s"
    )
    if sel.filters and sel.stopped_early:
        head += f"; the first {len(sel.rows):,} matching {', '.join(sel.filters)}"
    elif sel.filters:
        head += f"; {sel.matched:,} matching {', '.join(sel.filters)}"
    head += f"; showing {len(sel.rows):,}"
    blocks = [head]  # one line, unwrapped: it holds a path
    for row in sel.rows:
        blocks.append(_block(row, sel.n, width))
    return "\n\n".join(blocks)


def _block(row: dict[str, Any], n: int, width: int) -> str:
    name = row["id"] if n == 1 else f"{row['id']} sample {row['sample_index']}"
    if row["error"] is not None:
        tokens = row["prompt_tokens"]
        facts = ["error row"] + ([f"{tokens:,} prompt tokens"] if tokens is not None else [])
    else:
        facts = [
            row["finish_reason"] or "unknown",
            f"{row['prompt_tokens']:,} prompt + {row['completion_tokens']:,} output tokens",
        ]
    lines = [f"== {name} | {' | '.join(facts)}"]
    for key, value in row.items():
        if key not in RESERVED_COLUMNS:
            lines.append(_field(key, _plain(value), width))
    if row.get("prompt") is not None:
        # A chat prompt ends with the template's line break before the answer: not worth a line.
        lines.append(_field("prompt", row["prompt"].rstrip("\n"), width))
    if row["error"] is not None:
        lines.append(_field("error", row["error"], width))
    else:
        lines.append(_field("text", row["text"] or "", width))
    return "\n".join(lines)


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)


def _field(label: str, text: str, width: int) -> str:
    """`label` in the label column, then `text` wrapped beside it; its own line breaks kept."""
    head = f"{label:<{LABEL_WIDTH - 1}} "
    if len(head) > LABEL_WIDTH:
        head = label + " "
    lines = []
    for i, line in enumerate(text.split("\n") or [""]):
        first = head if i == 0 else " " * LABEL_WIDTH
        lines.append(_wrap(line, width, first, " " * LABEL_WIDTH))
    return "\n".join(lines)


def _wrap(text: str, width: int, first: str, rest: str) -> str:
    if not text.strip():
        return first.rstrip()
    return textwrap.fill(
        text,
        width,
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=True,
        break_on_hyphens=False,
        drop_whitespace=True,
        replace_whitespace=False,
    )
