"""`batchgen report OUT --html FILE`: one self-contained HTML page about a run.

Built only from what is committed: the rank manifests (states, settings, each shard's counts,
commit time and the run's generation time at that commit) and the committed shards (token
counts, finish reasons, errors, sample rows), so it can be made while the job runs. The page
holds its charts as inline SVG (pipeline/charts.py) and its style inline; a Content Security
Policy forbids it any script or network request, so it opens anywhere, offline.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline import __version__, charts
from pipeline.checkpoint import Manifest, RankSummary
from pipeline.errors import BatchgenError
from pipeline.humanize import fmt_duration
from pipeline.prompts import error_kind
from pipeline.sinks import read_shard_metadata, shard_files
from pipeline.status import RunStatus, read_status
from pipeline.storage.outpath import parquet_source

SAMPLE_ROWS = 12
EXAMPLE_IDS = 5
# Shards read for the distributions, error kinds and sample rows: every one up to this many,
# else this many evenly spaced (totals come from the manifests), so the page costs the same
# at 10,000 shards as at 200.
REPORT_SHARDS = 200
TEXT_CHARS = 400  # of a sample row's prompt and text shown in the table


@dataclass(slots=True)
class _ErrorKind:
    rows: int = 0
    ids: list[str] = field(default_factory=list)
    message: str = ""


@dataclass(slots=True)
class _Data:
    """What the committed shards hold, counted in one pass, one shard at a time."""

    rows: int = 0
    prompt_lengths: Counter[int] = field(default_factory=Counter)  # prompts, error rows excluded
    completion_lengths: Counter[int] = field(default_factory=Counter)  # output rows, no errors
    finish_reasons: Counter[str] = field(default_factory=Counter)
    errors: dict[str, _ErrorKind] = field(default_factory=dict)
    sample: list[dict[str, Any]] = field(default_factory=list)
    has_prompt: bool = False
    shards_read: int = 0  # the shards counted above: every one, or a sample of REPORT_SHARDS
    shards_total: int = 0


def write_report(out_dir: Path, html: Path) -> str:
    """Write the report page of `out_dir` to `html`; a one-line summary of what it shows."""
    status = read_status(out_dir)
    files = shard_files(out_dir)
    data = _read_shards(_spread(files, REPORT_SHARDS))
    data.shards_total = len(files)
    page = render_page(out_dir, status, data, time.time())
    try:
        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise BatchgenError(f"--html {html}: cannot write it ({exc.strerror or exc})") from exc
    sampled = (
        f"; distributions from {data.shards_read:,} of them"
        if data.shards_read < len(files)
        else ""
    )
    return (
        f"wrote {html} ({len(page.encode()) / 1024:,.0f} KB): "
        f"{status.to_dict()['all']['rows']:,} committed rows of {out_dir} in "
        f"{len(files):,} shards{sampled}, {len(status.ranks)} rank(s)"
    )


def _spread(files: list[Path], most: int) -> list[Path]:
    """At most `most` of `files`, evenly spaced (the first and the last included): a sample
    of shards over every rank and over time, the same on every call."""
    if len(files) <= most:
        return files
    step = (len(files) - 1) / (most - 1)
    return [files[round(i * step)] for i in range(most)]


def _read_shards(files: list[Path]) -> _Data:
    """Distributions, error kinds and sample rows over `files`, one shard at a time."""
    data = _Data(shards_read=len(files), shards_total=len(files))
    picks: list[tuple[int, int]] = []  # (file, row) of the sample rows: a reservoir
    rng = random.Random(0)
    columns = ["id", "sample_index", "finish_reason", "prompt_tokens", "completion_tokens", "error"]
    for f, path in enumerate(files):
        table = pq.read_table(parquet_source(path), columns=columns).to_pydict()
        for i, (row_id, index, reason, prompt, completion, error) in enumerate(
            zip(*(table[c] for c in columns), strict=True)
        ):
            data.rows += 1
            if error is not None:
                data.finish_reasons["error"] += 1
                kind = data.errors.setdefault(error_kind(error), _ErrorKind(message=error))
                kind.rows += 1
                if len(kind.ids) < EXAMPLE_IDS and row_id not in kind.ids:
                    kind.ids.append(row_id)
            else:
                data.finish_reasons[reason or "unknown"] += 1
                data.completion_lengths[completion or 0] += 1
                if index == 0 and prompt is not None:
                    data.prompt_lengths[prompt] += 1
            if len(picks) < SAMPLE_ROWS:
                picks.append((f, i))
            else:
                j = rng.randrange(data.rows)
                if j < SAMPLE_ROWS:
                    picks[j] = (f, i)
    for f in sorted({f for f, _ in picks}):
        schema = pq.read_schema(parquet_source(files[f]))
        data.has_prompt = data.has_prompt or "prompt" in schema.names
        wanted = [c for c in schema.names if c not in ("sample_index",)]
        table = pq.read_table(parquet_source(files[f]), columns=wanted)
        for _, i in sorted(p for p in picks if p[0] == f):
            data.sample.append({c: table[c][i].as_py() for c in wanted})
    return data


def render_page(out_dir: Path, status: RunStatus, data: _Data, now: float) -> str:
    """The whole HTML page."""
    manifests = [r.manifest for r in status.ranks if r.manifest is not None]
    # The charts draw each shard's commit: the whole shard lists, which status does not read.
    full = [m for r in status.ranks if r.manifest and (m := Manifest.load(out_dir, r.rank))]
    summary = status.to_dict()["all"]
    files = shard_files(out_dir)
    meta = (read_shard_metadata(files[0]) if files else None) or {}
    title = f"batchgen report: {out_dir}"
    generated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    sections = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="sub">state <b>{escape(status.state)}</b> · {len(status.ranks)} rank(s) · '
        f"generated {generated} by batchgen {escape(__version__)} from what is committed "
        "(a running job's later commits are not in it)</p>",
        _cards(summary, manifests),
        "<h2>Ranks</h2>",
        _rank_table(status, now),
        "<h2>Progress and throughput</h2>",
        _time_charts(full),
        "<h2>Tokens and finish reasons</h2>",
        _sample_note(data),
        _token_charts(data),
        "<h2>Error rows</h2>",
        _sample_note(data),
        _error_table(data),
        "<h2>Sample rows</h2>",
        _sample_table(data),
        "<h2>Settings and versions</h2>",
        _settings(manifests, meta),
    ]
    return PAGE.format(title=escape(title), body="\n".join(sections))


def _cards(summary: dict[str, Any], manifests: list[RankSummary]) -> str:
    total = summary["total_prompts"]
    done = f"{summary['prompts']:,}" + (f" / {total:,}" if total is not None else "")
    runs = [(m.report or {}).get("this_run") or {} for m in manifests]
    seconds = sum(r.get("generate_seconds") or 0 for r in runs)
    tokens = sum(r.get("completion_tokens") or 0 for r in runs)
    rate = f"{tokens / seconds:,.1f}" if seconds else "not recorded"
    cards = [
        ("prompts committed", done),
        ("output rows", f"{summary['rows']:,}"),
        ("error rows", f"{summary['errors']:,}"),
        ("prompt tokens", f"{summary['prompt_tokens']:,}"),
        ("output tokens", f"{summary['completion_tokens']:,}"),
        ("last runs' output tok/s", rate),
    ]
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="k">{escape(k)}</div><div class="v">{escape(v)}</div></div>'
            for k, v in cards
        )
        + "</div>"
    )


def _rank_table(status: RunStatus, now: float) -> str:
    rows = []
    for r in status.ranks:
        m = r.manifest
        if m is None:
            rows.append(f"<tr><td>{r.rank}</td><td>{escape(r.label())}</td>" + "<td></td>" * 6)
            continue
        total = f" / {m.total_prompts:,}" if m.total_prompts is not None else ""
        this = (m.report or {}).get("this_run") or {}
        rate = this.get("output_tokens_per_second")
        gen = this.get("generate_seconds")
        rows.append(
            f"<tr><td>{r.rank}</td><td>{escape(r.label())}</td>"
            f"<td class=n>{m.prompts_committed:,}{total}</td><td class=n>{m.rows_committed:,}</td>"
            f"<td class=n>{m.errors:,}</td><td class=n>{m.totals.shards:,}</td>"
            f"<td class=n>{'' if rate is None else f'{rate:,.1f}'}"
            f"{'' if gen is None else f' over {fmt_duration(gen, tenths=True)}'}</td>"
            f"<td>{fmt_duration(max(now - m.updated_at, 0))} ago</td></tr>"
        )
    head = (
        "<tr><th>rank</th><th>state</th><th>prompts</th><th>rows</th><th>errors</th>"
        "<th>shards</th><th>last run: output tok/s</th><th>updated</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _time_series(
    timed: list[tuple[Manifest, list[dict[str, Any]]]], t0: float, scale: float
) -> tuple[list, list, list[float]]:
    """Each rank's prompts committed over time, its throughput segments (one per run) and
    where each run's generation started, in the charts' time unit."""
    progress, throughput, starts = [], [], []
    for m, shards in timed:
        if not shards:
            continue
        done = sum(s["prompts"] for s in m.shards if s.get("committed_at") is None)
        points = [((m.started_at - t0) / scale, float(done))] if m.started_at else []
        for s in shards:
            done += s["prompts"]
            points.append(((s["committed_at"] - t0) / scale, float(done)))
        progress.append((f"rank {m.rank}", [points]))
        segments = []
        for run in _runs(shards):
            starts.append((run[0]["committed_at"] - run[0]["generate_seconds"] - t0) / scale)
            segments.append([((t - t0) / scale, rate) for t, rate in _rates(run)])
        throughput.append((f"rank {m.rank}", segments))
    return progress, throughput, starts


def _time_charts(manifests: list[Manifest]) -> str:
    timed = [
        (m, sorted((s for s in m.shards if s.get("committed_at") is not None), key=_commit_time))
        for m in manifests
    ]
    if not any(shards for _, shards in timed):
        return _missing(
            "No commit times are recorded in these manifests (they were written by a batchgen "
            "from before commit times were kept), so progress over time cannot be drawn."
        )
    commits = [s["committed_at"] for _, shards in timed for s in shards]
    t0 = min([m.started_at for m, _ in timed if m.started_at] + commits)
    span = max(commits) - t0
    scale, unit = (60.0, "min") if span > 180 else (1.0, "s")
    progress, throughput, starts = _time_series(timed, t0, scale)
    x_label = f"time since the run started ({unit})"
    x_range = (0.0, span / scale)
    markers = [(x, "generation starts") for x in sorted(set(starts))]
    parts = [
        charts.line_chart(
            "Prompts committed", x_label, "prompts committed (prompts)", progress, x_range, markers
        )
    ]
    captions = [
        "Each point is a commit: the prompts committed so far. The dashed line marks where "
        "generation began (before it: reading the input and starting the engine)."
    ]
    if any(segments for _, segments in throughput):
        parts.append(
            charts.line_chart(
                "Output throughput between commits",
                x_label,
                "output tokens per second (tok/s)",
                throughput,
                x_range,
                markers,
            )
        )
        captions.append(
            "Each point: output tokens committed since the previous point, divided by the "
            "generation time between them. Tokens count when their rows are committed, so where "
            "shards are smaller than the engine's batch the curve lags and bunches."
        )
    else:
        parts.append(_missing("No generation times are recorded with the commits."))
        captions.append("")
    return _panels(parts, captions)


def _panels(charts_svg: list[str], captions: list[str] | None = None) -> str:
    notes = captions or [""] * len(charts_svg)
    return (
        '<div class="grid">'
        + "".join(
            f'<div class="panel">{svg}'
            + (f'<p class="cap">{escape(note)}</p>' if note else "")
            + "</div>"
            for svg, note in zip(charts_svg, notes, strict=True)
        )
        + "</div>"
    )


def _commit_time(shard: dict[str, Any]) -> float:
    return shard["committed_at"]


def _runs(shards: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Shards (in commit order) grouped by the run that wrote them: a run's generation clock
    only grows, and a shard without one (adopted, or older) ends a group."""
    runs: list[list[dict[str, Any]]] = []
    previous = None
    for s in shards:
        g = s.get("generate_seconds")
        if g is None:
            previous = None
            continue
        if previous is None or g < previous:
            runs.append([])
        runs[-1].append(s)
        previous = g
    return runs


def _rates(run: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(commit time, output tok/s since the previous point) over one run's shards. Shards
    committed in one burst (one engine step finished several shards' worth of rows) are one
    point: their tokens were made over the time since the point before, not between them."""
    gap = max(0.5, 0.02 * run[-1]["generate_seconds"])
    points: list[tuple[float, float]] = []
    begin = 0.0
    tokens = 0
    for i, s in enumerate(run):
        tokens += s["completion_tokens"]
        g = s["generate_seconds"]
        last = i == len(run) - 1
        if not last and run[i + 1]["generate_seconds"] - g < gap:
            continue  # the next shard belongs to the same burst
        if g > begin:
            points.append((s["committed_at"], tokens / (g - begin)))
            begin, tokens = g, 0
    return points


def _sample_note(data: _Data) -> str:
    """Says that the counts below are a sample's, when they are."""
    if data.shards_read >= data.shards_total:
        return ""
    return (
        f"<p>From a sample: {data.shards_read:,} of the {data.shards_total:,} committed shards "
        f"({data.rows:,} rows), evenly spaced over the ranks; the totals above come from the "
        "manifests.</p>"
    )


def _token_charts(data: _Data) -> str:
    parts = []
    if data.prompt_lengths:
        parts.append(
            charts.histogram(
                "Prompt length",
                "prompt tokens per prompt (tokens)",
                "prompts (prompts)",
                data.prompt_lengths,
            )
        )
    else:
        parts.append(_missing("No prompt reached the engine yet."))
    if data.completion_lengths:
        parts.append(
            charts.histogram(
                "Completion length",
                "output tokens per row (tokens)",
                "output rows (rows)",
                data.completion_lengths,
            )
        )
    else:
        parts.append(_missing("No completion is committed yet."))
    if data.finish_reasons:
        bars = sorted(data.finish_reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        parts.append(
            charts.bar_chart("Finish reasons", "finish reason", "output rows (rows)", bars)
        )
    return _panels(parts)


def _error_table(data: _Data) -> str:
    if not data.errors:
        return "<p>No error rows.</p>"
    rows = [
        f"<tr><td>{escape(kind)}</td><td class=n>{e.rows:,}</td>"
        f"<td>{escape(', '.join(e.ids))}</td><td>{escape(e.message)}</td></tr>"
        for kind, e in sorted(data.errors.items(), key=lambda kv: (-kv[1].rows, kv[0]))
    ]
    head = "<tr><th>kind</th><th>rows</th><th>example ids</th><th>first message</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _sample_table(data: _Data) -> str:
    if not data.sample:
        return "<p>No committed rows yet.</p>"
    keep = [
        c
        for c in data.sample[0]
        if c not in ("id", "text", "prompt", "finish_reason", "prompt_tokens", "completion_tokens")
        and c != "error"
    ]
    head = (
        "<tr><th>id</th><th>finish</th><th>tokens (prompt + output)</th>"
        + "".join(f"<th>{escape(c)}</th>" for c in keep)
        + ("<th>prompt</th>" if data.has_prompt else "")
        + "<th>text or error</th></tr>"
    )
    rows = []
    for r in data.sample:
        finish = "error" if r["error"] is not None else (r["finish_reason"] or "")
        tokens = " + ".join(
            "-" if r[k] is None else f"{r[k]:,}" for k in ("prompt_tokens", "completion_tokens")
        )
        out = r["error"] if r["error"] is not None else (r["text"] or "")
        rows.append(
            f"<tr><td>{escape(r['id'])}</td><td>{escape(finish)}</td><td class=n>{tokens}</td>"
            + "".join(f"<td>{escape(_cell(r.get(c)))}</td>" for c in keep)
            + (
                f'<td class="t">{escape(_clip(r.get("prompt") or ""))}</td>'
                if data.has_prompt
                else ""
            )
            + f'<td class="t">{escape(_clip(out))}</td></tr>'
        )
    return (
        f"<p>{len(data.sample)} rows drawn at random (seed 0) from {data.rows:,} committed rows"
        + (
            f" of {data.shards_read:,} sampled shards"
            if data.shards_read < data.shards_total
            else ""
        )
        + f"; long texts cut at {TEXT_CHARS} characters.</p><table>{head}{''.join(rows)}</table>"
    )


def _settings(manifests: list[RankSummary], meta: dict[str, Any]) -> str:
    if not manifests:
        return "<p>No rank has written a manifest yet.</p>"
    fp = manifests[0].fingerprint
    engine = (
        next(
            ((m.report or {}).get("engine") for m in manifests if (m.report or {}).get("engine")),
            {},
        )
        or {}
    )
    items = [
        ("model", fp.get("model")),
        ("model_impl", fp.get("model_impl")),
        ("dtype", meta.get("dtype") or fp.get("dtype")),
        ("max_model_len", engine.get("max_model_len") or fp.get("max_model_len")),
        ("sampling", fp.get("sampling")),
        ("seed", fp.get("seed")),
        ("prompt", fp.get("prompt")),
        ("input", (fp.get("input") or {}).get("spec") or (fp.get("input") or {}).get("dataset")),
        ("id column", fp.get("id_column")),
        ("output columns", fp.get("columns")),
        ("ranks", fp.get("num_shards")),
        ("engine", {k: v for k, v in engine.items() if k not in ("model", "vllm", "transformers")}),
        ("batchgen", meta.get("batchgen")),
        ("vLLM", meta.get("vllm") or engine.get("vllm")),
        ("Transformers", meta.get("transformers") or engine.get("transformers")),
    ]
    versions = ("batchgen", "vLLM", "Transformers")
    rows = "".join(
        f"<tr><th>{escape(k)}</th><td><code>"
        f"{escape(_cell(v, '(not recorded)' if k in versions else '(none)'))}</code></td></tr>"
        for k, v in items
    )
    return f'<table class="kv">{rows}</table>'


def _missing(text: str) -> str:
    return f'<div class="missing">{escape(text)}</div>'


def _cell(value: Any, missing: str = "") -> str:
    if value is None:
        return missing
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _clip(text: str) -> str:
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + " …"


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       margin: 24px auto; max-width: 1180px; padding: 0 16px; font-size: 14px; }}
h1 {{ font-size: 22px; margin: 0 0 4px; }}
h2 {{ font-size: 17px; margin: 28px 0 10px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }}
.sub {{ color: #555; margin: 0 0 16px; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 10px; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 150px; }}
.card .k {{ color: #555; font-size: 12px; }} .card .v {{ font-size: 20px; font-weight: 600; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(570px, 1fr)); gap: 12px; }}
.panel {{ border: 1px solid #e3e3e3; border-radius: 6px; padding: 4px; }}
.panel svg {{ width: 100%; height: auto; display: block; }}
.cap {{ color: #555; font-size: 12px; margin: 2px 10px 8px; }}
.missing {{ border: 1px dashed #bbb; border-radius: 6px; padding: 16px; color: #555; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border-bottom: 1px solid #eee; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f6f6f6; }} td.n {{ text-align: right; white-space: nowrap; }}
td.t {{ white-space: pre-wrap; font-size: 12px; max-width: 420px; }}
table.kv th {{ width: 160px; }} code {{ font-size: 12px; white-space: pre-wrap; word-break: break-word; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""
