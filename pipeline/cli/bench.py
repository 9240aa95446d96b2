"""`batchgen bench`: batchgen against raw vLLM on the same work, or its memory and I/O path.

Every flag is a field: the engine and server flags are `batchgen run`'s, the rest are the bench
configs' (pipeline/config/bench.py), one dataclass per kind of bench.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from pipeline.cli.common import (
    Stopped,
    click_errors,
    close_engines_after,
    given_options,
    logs_to_stderr,
    long_flag,
    setup_logging,
    stop_raises,
)
from pipeline.cli.flags import build, declared, engine_config, group_options, server_config
from pipeline.config.bench import (
    MEMORY_ROWS_PER_SHARD,
    MEMORY_SHARES,
    BenchConfig,
    MemoryBenchConfig,
    ReuseLookupConfig,
    ScaleBenchConfig,
)
from pipeline.errors import EXIT_INTERRUPTED

log = logging.getLogger("batchgen")

BENCH_EXAMPLES = """\b
Examples:
  # this machine, the bundled model, a few hundred prompts (under 10 minutes on 2 CPU cores)
  batchgen bench
\b
  # a GPU host, a shape-only model folder with random weights
  python3 -m pipeline bench --model /root/models/llama-8b-shape --engine-arg load_format=dummy \\
      --prompts 2048 --max-tokens 512 --json
\b
  # tuned settings (from `batchgen tune`) against raw vLLM with its defaults, on a rewrite job
  batchgen bench --raw-defaults --engine-arg 'speculative_config={"method": "ngram", \
      "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}' \
      --task 'Rewrite the following text in a formal tone.' --stop-at-eos
\b
  # what the HTTP hop costs: side (b) sends its rows to `vllm serve` of the same model
  batchgen bench --server http://127.0.0.1:8000/v1 --dtype float32
\b
  # peak memory and the I/O path's rows/s with the fake engine, 250k and 1M input rows
  batchgen bench --memory
\b
  # a job of 1,000 ranks with the fake engine: status, show, report, plan and commits timed
  batchgen bench --scale --ranks 1000 --rows-per-rank 100 --rows-per-shard 10 \\
      --input-files 20 --output /tmp/scale --json
"""


@click.command(epilog=BENCH_EXAMPLES)
@group_options("engine", "server", "bench", "bench-memory", "bench-reuse", "bench-scale")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("-v", "--verbose", count=True, help="More logging (-v: vLLM's too).")
@click.pass_context
def bench(ctx: click.Context, **kw: Any) -> None:
    """Measure batchgen against raw vLLM on the same work, or its memory and I/O path.

    Times (a) one raw `LLM.generate` call over every prompt (as token ids) and (b) the full
    `batchgen run` from Parquet to Parquet shards, in alternating rounds on one engine, and
    prints output tok/s, prompt+output tok/s, the engine start and the ratio b/a.
    """
    setup_logging(kw.pop("verbose"))
    logs_to_stderr()  # --json promises stdout holds one JSON object
    lookup = build(ReuseLookupConfig, kw)
    if lookup.reuse_lookup is not None:
        _bench_reuse_lookup(lookup.reuse_lookup, kw)
        return
    scale = build(ScaleBenchConfig, kw)
    if scale.scale:
        _bench_scale(scale, kw)
        return
    _refuse_scale_flags(ctx)
    memory = build(MemoryBenchConfig, kw)
    _check_flags(ctx, kw, memory)
    from pipeline import bench as benchmod

    emit = benchmod.reserve_stdout() if kw["as_json"] else click.echo
    with click_errors():
        if memory.memory:
            report = benchmod.run_memory(
                memory.sizes,
                model=kw["model"],
                chat=kw["chat"],
                rows_per_shard=kw["rows_per_shard"] or MEMORY_ROWS_PER_SHARD,
                work_dir=kw["work_dir"],
                logprobs=kw["logprobs"],
            )
            text = benchmod.format_memory(report)
        else:
            cfg = build(
                BenchConfig,
                kw,
                engine=engine_config(kw, backend="vllm", server=None),
                server=server_config(kw),
            )
            report = _throughput(benchmod, cfg)
            text = benchmod.format_report(report)
    emit(benchmod.to_json(report) if kw["as_json"] else text)


def _throughput(benchmod: Any, cfg: BenchConfig) -> dict[str, Any]:
    """The throughput bench; a stop signal ends it in one line, exit 75: its engines closed
    (the warm sides' workers as their context unwinds: a busy one gets SIGTERM), no figures
    (a bench keeps no state: rerun it)."""
    with stop_raises():
        try:
            return benchmod.run_throughput(cfg)
        except Stopped as stop:
            close_engines_after(stop)
            log.warning("bench: stopped by %s; no figures (a bench keeps no state: rerun it)",
                        stop.name)  # fmt: skip
            sys.exit(EXIT_INTERRUPTED)


def _check_flags(ctx: click.Context, kw: dict[str, Any], memory: MemoryBenchConfig) -> None:
    """Refuse flags that mean nothing for the bench chosen."""
    if memory.memory:
        # The throughput bench's own flags (--server among them) but those --memory shares.
        throughput_only = {f.name for _, f, _ in declared("bench")} - set(MEMORY_SHARES)
        wrong = [p for p, _ in given_options(ctx) if p.name in throughput_only | {"url"}]
        if wrong:
            flags = ", ".join(sorted(long_flag(p) for p in wrong))
            raise click.UsageError(f"{flags}: only for the throughput bench; drop --memory")
    if kw["backend"] == "fake" and not memory.memory:
        raise click.UsageError(
            "--engine fake: the throughput bench compares batchgen with vLLM; use --memory for "
            "the fake engine"
        )


def _bench_reuse_lookup(rows: int, kw: dict[str, Any]) -> None:
    """`batchgen bench --reuse-lookup ROWS`: pipeline/bench/reuse.py does the work."""
    from pipeline.bench.machine import bench_folder, reserve_stdout, to_json
    from pipeline.bench.reuse import format_reuse_lookup, run_reuse_lookup

    emit = reserve_stdout() if kw["as_json"] else click.echo
    with click_errors(usage=False), bench_folder(kw["work_dir"]) as folder:
        report = run_reuse_lookup(rows, folder)
    emit(to_json(report) if kw["as_json"] else format_reuse_lookup(report))


def _refuse_scale_flags(ctx: click.Context) -> None:
    """--ranks, --rows-per-rank, --input-files and --output mean something with --scale only."""
    scale_only = {f.name for _, f, _ in declared("bench-scale")}
    wrong = [p for p, _ in given_options(ctx) if p.name in scale_only]
    if wrong:
        raise click.UsageError(f"{', '.join(long_flag(p) for p in wrong)}: only for --scale")


def _bench_scale(scale: ScaleBenchConfig, kw: dict[str, Any]) -> None:
    """`batchgen bench --scale`: pipeline/bench/scale.py does the work."""
    from pipeline.bench.machine import reserve_stdout, to_json
    from pipeline.bench.scale import format_one_rank, format_scale, run_one_rank, run_scale

    assert scale.output is not None  # ScaleBenchConfig refuses --scale without it
    emit = reserve_stdout() if kw["as_json"] else click.echo
    with click_errors(usage=False):
        if scale.ranks == 1:
            shard = kw["rows_per_shard"] or 10_000
            report = run_one_rank(scale.rows_per_rank, shard, scale.output)
            emit(to_json(report) if kw["as_json"] else format_one_rank(report))
            return
        report = run_scale(
            scale.ranks,
            scale.rows_per_rank,
            kw["rows_per_shard"] or 10,
            scale.input_files,
            scale.output,
        )
    emit(to_json(report) if kw["as_json"] else format_scale(report))
