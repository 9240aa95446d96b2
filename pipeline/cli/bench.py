"""`batchgen bench`: batchgen against raw vLLM on the same work, or its memory and I/O path.

Its own flags are declared here: pipeline/bench's BenchConfig is not (yet) a declare-once
dataclass. The engine and server flags are generated as for `batchgen run`.
"""

from __future__ import annotations

from typing import Any

import click

from pipeline.cli.common import (
    click_errors,
    file_option,
    logs_to_stderr,
    long_flag,
    setup_logging,
)
from pipeline.cli.flags import engine_config, group_options, server_config

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

# Flags of the throughput bench that mean nothing with --memory.
_THROUGHPUT_ONLY = (
    "prompts",
    "system_prompt",
    "min_tokens",
    "max_tokens",
    "min_prompt_tokens",
    "max_prompt_tokens",
    "temperature",
    "rounds",
    "budget_seconds",
    "max_inflight",
    "with_transformers",
    "transformers_prompts",
    "url",
    "json_schema",
    "choice",
    "raw_defaults",
    "task",
    "stop_at_eos",
    "replicas_per_gpu",
)


@click.command(epilog=BENCH_EXAMPLES)
@group_options("engine", "server")
@click.option("--prompts", type=int, default=256, show_default=True, help="Prompts per pass.")
@click.option(
    "--max-tokens",
    type=int,
    default=128,
    show_default=True,
    help="Longest output budget; each prompt's is log-uniform in [--min-tokens, this].",
)
@click.option("--min-tokens", type=int, default=8, show_default=True, help="Shortest budget.")
@click.option("--max-prompt-tokens", type=int, default=512, show_default=True)
@click.option("--min-prompt-tokens", type=int, default=16, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option(
    "--chat/--no-chat",
    default=True,
    show_default=True,
    help="Render prompts through the chat template.",
)
@click.option(
    "--system-prompt",
    metavar="TEXT",
    help="One system message for every prompt (a shared prefix, as prefix caching serves).",
)
@click.option(
    "--task",
    metavar="TEXT",
    help="Every prompt's instruction, e.g. 'Rewrite the following text in a formal tone.' "
    "[default: a mix of tasks].",
)
@click.option(
    "--stop-at-eos",
    is_flag=True,
    help="Stop outputs at end-of-sequence as a job does (budgets become caps; each side's own "
    "tokens count), e.g. to compare settings that change greedy texts.",
)
@click.option(
    "--rounds",
    type=int,
    default=5,
    show_default=True,
    help="Rounds of raw and batchgen, alternating which goes first; medians are reported.",
)
@click.option(
    "--budget-seconds",
    type=float,
    default=540.0,
    show_default=True,
    help="Start no round that would end later than this (0: no limit).",
)
@click.option(
    "--rows-per-shard",
    type=int,
    help="Commit a shard every this many rows [default: prompts/8, at most 2000; --memory: 2000].",
)
@click.option("--max-inflight", type=int, help="As for `batchgen run`.")
@click.option(
    "--raw-defaults",
    is_flag=True,
    help="Time raw vLLM on its own engine with vLLM's defaults for the settings `batchgen tune` "
    "searches; batchgen on the engine these flags describe.",
)
@click.option(
    "--replicas-per-gpu",
    metavar="N[,N...]",
    help="Batchgen sides of N engine replicas sharing each GPU (e.g. 1,2: two sides); every "
    "side on engines of its own, kept warm, rounds alternating.",
)
@click.option(
    "--with-transformers", is_flag=True, help="Also time plain Transformers generate (the floor)."
)
@click.option(
    "--transformers-prompts",
    type=int,
    default=32,
    show_default=True,
    help="Prompts for --with-transformers.",
)
@file_option("--json-schema", "Both sides constrain their outputs to this JSON Schema.")
@click.option("--choice", multiple=True, help="Both sides answer with one of these; repeatable.")
@click.option("--logprobs", type=int, help="Both sides return the top K logprobs per token.")
@click.option("--seed", type=int, default=0, show_default=True, help="Prompt set and run seed.")
@click.option(
    "--memory", is_flag=True, help="Measure peak RSS and I/O rows/s with the fake engine instead."
)
@click.option(
    "--memory-rows",
    metavar="N,N",
    help="Input sizes for --memory [default: 250000,1000000].",
)
@click.option(
    "--work-dir", metavar="DIR", help="Keep inputs and outputs here [default: a temp dir]."
)
@click.option(
    "--reuse-lookup",
    type=int,
    metavar="ROWS",
    help="Measure the --reuse lookup over a folder of ROWS committed rows instead "
    "(pipeline/bench/reuse.py); --work-dir holds the folder.",
)
@click.option(
    "--scale",
    is_flag=True,
    help="Build a synthetic job of --ranks ranks with the fake engine and time rank start, "
    "resume, commits, status, show, report and plan over it (pipeline/bench/scale.py).",
)
@click.option(
    "--ranks",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="--scale: ranks of the job (1: one rank with --id-column killed at half and resumed, "
    "against a 100k-row run).",
)
@click.option("--rows-per-rank", type=click.IntRange(min=2), default=100, show_default=True)
@click.option("--input-files", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--output", metavar="DIR", help="--scale: the job's folder, left behind.")
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
    if kw["reuse_lookup"] is not None:
        _bench_reuse_lookup(kw)
        return
    if kw["scale"]:
        _bench_scale(kw)
        return
    _check_flags(ctx, kw)
    from pipeline import bench as benchmod

    emit = benchmod.reserve_stdout() if kw["as_json"] else click.echo
    with click_errors():
        if kw["memory"]:
            report = benchmod.run_memory(
                _memory_sizes(kw["memory_rows"]),
                model=kw["model"],
                chat=kw["chat"],
                rows_per_shard=kw["rows_per_shard"] or 2000,
                work_dir=kw["work_dir"],
                logprobs=kw["logprobs"],
            )
            text = benchmod.format_memory(report)
        else:
            report = benchmod.run_throughput(_throughput_config(kw))
            text = benchmod.format_report(report)
    emit(benchmod.to_json(report) if kw["as_json"] else text)


def _check_flags(ctx: click.Context, kw: dict[str, Any]) -> None:
    """Refuse flags that mean nothing for the bench chosen."""
    given = {
        name
        for name in kw
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    }
    scale_only = sorted(given & {"ranks", "rows_per_rank", "input_files", "output"})
    if scale_only:
        flags = ", ".join(long_flag(p) for p in ctx.command.params if p.name in scale_only)
        raise click.UsageError(f"{flags}: only for --scale")
    if kw["memory"]:
        wrong = sorted(given & set(_THROUGHPUT_ONLY))
        if wrong:
            flags = ", ".join(sorted(long_flag(p) for p in ctx.command.params if p.name in wrong))
            raise click.UsageError(f"{flags}: only for the throughput bench; drop --memory")
    elif kw["memory_rows"] is not None:
        raise click.UsageError("--memory-rows needs --memory")
    if kw["backend"] == "fake" and not kw["memory"]:
        raise click.UsageError(
            "--engine fake: the throughput bench compares batchgen with vLLM; use --memory for "
            "the fake engine"
        )


def _bench_reuse_lookup(kw: dict[str, Any]) -> None:
    """`batchgen bench --reuse-lookup ROWS`: pipeline/bench/reuse.py does the work."""
    from pipeline.bench.machine import bench_folder, reserve_stdout, to_json
    from pipeline.bench.reuse import format_reuse_lookup, run_reuse_lookup

    if kw["reuse_lookup"] < 1:
        raise click.UsageError(f"--reuse-lookup {kw['reuse_lookup']}: must be at least 1 row")
    emit = reserve_stdout() if kw["as_json"] else click.echo
    with click_errors(usage=False), bench_folder(kw["work_dir"]) as folder:
        report = run_reuse_lookup(kw["reuse_lookup"], folder)
    emit(to_json(report) if kw["as_json"] else format_reuse_lookup(report))


def _bench_scale(kw: dict[str, Any]) -> None:
    """`batchgen bench --scale`: pipeline/bench/scale.py does the work."""
    from pipeline.bench.machine import reserve_stdout, to_json
    from pipeline.bench.scale import format_one_rank, format_scale, run_one_rank, run_scale

    if not kw["output"]:
        raise click.UsageError("--scale needs --output DIR (the job is left there)")
    emit = reserve_stdout() if kw["as_json"] else click.echo
    if kw["ranks"] == 1:
        with click_errors(usage=False):
            report = run_one_rank(kw["rows_per_rank"], kw["rows_per_shard"] or 10_000, kw["output"])
        emit(to_json(report) if kw["as_json"] else format_one_rank(report))
        return
    with click_errors(usage=False):
        report = run_scale(
            kw["ranks"],
            kw["rows_per_rank"],
            kw["rows_per_shard"] or 10,
            kw["input_files"],
            kw["output"],
        )
    emit(to_json(report) if kw["as_json"] else format_scale(report))


def _throughput_config(kw: dict[str, Any]) -> Any:
    """The BenchConfig of the throughput bench's flags."""
    from pipeline import bench as benchmod

    engine = engine_config(kw, backend="vllm", server=None)
    raw_engine = None
    if kw["raw_defaults"]:
        from pipeline.tune import baseline_engine

        raw_engine = baseline_engine(engine)
    return benchmod.BenchConfig(
        engine=engine,
        raw_engine=raw_engine,
        server=server_config(kw),
        request=tuple(
            (k, tuple(v) if isinstance(v, tuple | list) else v)
            for k in ("json_schema", "choice", "logprobs")
            if (v := kw[k]) not in (None, ())
        ),
        replicas=_replica_counts(kw["replicas_per_gpu"]),
        **{name: kw[name] for name in _BENCH_FIELDS},
    )


# Flags of the throughput bench handed to BenchConfig as they are.
_BENCH_FIELDS = (
    "prompts",
    "min_tokens",
    "max_tokens",
    "min_prompt_tokens",
    "max_prompt_tokens",
    "temperature",
    "chat",
    "system_prompt",
    "rounds",
    "budget_seconds",
    "rows_per_shard",
    "max_inflight",
    "with_transformers",
    "transformers_prompts",
    "seed",
    "work_dir",
    "task",
    "stop_at_eos",
)


def _replica_counts(value: str | None) -> tuple[int, ...]:
    """--replicas-per-gpu 1,2: the replica count of each batchgen side; () without it."""
    if value is None:
        return ()
    try:
        counts = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise click.BadParameter(
            f"{value!r}: expected distinct replica counts separated by commas, e.g. 1,2",
            param_hint="--replicas-per-gpu",
        )
    return counts


def _memory_sizes(value: str | None) -> tuple[int, ...]:
    if value is None:
        return (250_000, 1_000_000)
    try:
        sizes = tuple(int(v.replace("_", "")) for v in value.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(
            f"{value!r}: expected row counts separated by commas, e.g. 250000,1000000",
            param_hint="--memory-rows",
        )
    return sizes
