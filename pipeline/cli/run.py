"""`batchgen run`: one rank in this process, or `--data-parallel` ranks on this node."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from pipeline.cli.common import click_errors, given_options, log, long_flag, setup_logging
from pipeline.cli.flags import (
    build,
    config_option,
    field_values,
    group_options,
    options,
    run_config,
)
from pipeline.config import EngineConfig
from pipeline.errors import EXIT_INTERRUPTED
from pipeline.ranks import launcher_rank, resolve_rank
from pipeline.replicas import ReplicaConfig

RUN_EXAMPLES = """\b
Examples:
  # a Parquet file (or folder, or glob), chat-templated prompts, the bundled model
  batchgen run --parquet data/prompts.parquet --prompt-column prompt --chat \\
      --max-tokens 128 --output out/sample
\b
  # a Hugging Face dataset folder or hub id, prompts built from columns
  batchgen run --dataset ./reviews --split train --template "Summarize:\\n{text}" \\
      --model Qwen/Qwen2.5-7B-Instruct --id-column review_id --output out/summaries
\b
  # JSON Lines files through the `json` builder, per-row chat messages, 4 samples each
  batchgen run --dataset json --data-files 'chats/*.jsonl' --messages-column messages \\
      --temperature 0.8 --n 4 --seed 1 --output out/chats
\b
  # on a running server (vllm serve MODEL --model-impl transformers); key from $OPENAI_API_KEY
  batchgen run --server http://gpu7:8000/v1 --model Qwen/Qwen2.5-7B-Instruct \\
      --parquet data/prompts.parquet --prompt-column prompt --chat --output out/served
\b
  # everything from a job config; flags given on the command line win
  batchgen run --config jobs/examples/sample.toml --max-tokens 64
\b
  # every GPU of this node, one rank per GPU (pairs of GPUs with --tensor-parallel-size 2)
  batchgen run --config jobs/examples/summarize.toml --data-parallel auto
\b
Rerunning the same command resumes an interrupted run; rerunning a finished one does nothing.
Exit codes: 0 done, 1 failed, 2 bad usage, 75 interrupted by a signal (rerun to resume).
"""


class _DataParallel(click.ParamType):
    """--data-parallel: a number of ranks, or `auto`."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r}: expected a number of ranks, e.g. 4, or auto", param, ctx)
        if number < 1:
            self.fail(f"{number}: must be at least 1 (or auto)", param, ctx)
        return number


data_parallel_option = click.option(
    "--data-parallel",
    type=_DataParallel(),
    help="Run the input as N ranks on this node, one process each on its own GPUs "
    "(auto: visible GPUs / --tensor-parallel-size; 1 on CPU).",
)
verbose_option = click.option(
    "-v",
    "--verbose",
    count=True,
    help="More logging: -v shows vLLM's own log on the terminal (else it goes to "
    "OUT/.batchgen/logs/engine-rank-N.log).",
)

# The flags of `run`, which `plan` and `tune` take too.
run_options = options(
    group_options("input", "prompt", "engine"),
    group_options("server"),
    group_options("sampling", "output"),
    data_parallel_option,
    group_options("ranks"),
    verbose_option,
)


@click.command(epilog=RUN_EXAMPLES)
@config_option()
@run_options
def run(**kw: Any) -> None:
    """Generate completions for every row of a dataset into sharded Parquet."""
    ctx = click.get_current_context()
    verbose = kw.pop("verbose")
    kw["engine_log"] = verbose == 0
    setup_logging(verbose)
    if not kw["path"]:
        raise click.UsageError("Missing option '--output' / '-o' (or `output` in --config).")
    data_parallel = kw.pop("data_parallel")
    replicas = build(ReplicaConfig, kw).replicas_per_gpu
    if replicas > 1 and data_parallel is None:
        data_parallel = "auto"
    if data_parallel is not None:
        node = _node_plan(kw, data_parallel, replicas)
        if node is not None:
            _run_node(ctx, kw, node)
            return
    rank = set_rank(kw)
    cfg = run_config(kw)
    if rank.from_launcher:
        from pipeline.slots import pin_local_gpus

        pinned = pin_local_gpus(rank, cfg.engine.tensor_parallel_size)
        if pinned:
            log.info("%s", pinned)
    from pipeline.runner import run as run_pipeline

    with click_errors():
        result = run_pipeline(cfg)
    if result.status == "interrupted":
        sys.exit(EXIT_INTERRUPTED)


def _node_plan(kw: dict[str, Any], data_parallel: int | str, replicas: int = 1):
    """The ranks and slots of `--data-parallel`; None when that is one rank in this process."""
    if kw["rank"] is not None:
        raise click.UsageError(
            f"--data-parallel {data_parallel} starts every rank itself; drop --rank "
            "(--num-ranks N alone with --data-parallel runs the N ranks, that many at a time)"
        )
    with click_errors():
        found = launcher_rank(kw["num_ranks"], os.environ)
    if found is not None:
        raise click.UsageError(
            f"--data-parallel {data_parallel} starts its own ranks, but {found.origin} already "
            f"made this process rank {found.rank} of {found.num_ranks}; drop --data-parallel "
            "and let the launcher start the ranks, or start batchgen outside the launcher"
        )
    from pipeline.slots import plan_node

    with click_errors():
        plan = plan_node(
            data_parallel,
            kw["num_ranks"],
            kw["tensor_parallel_size"],
            replicas_per_gpu=replicas,
            run_flags={
                "gpu_memory_utilization": kw["gpu_memory_utilization"],
                "model": kw["model"],
                "engine_args": field_values(EngineConfig, kw)["engine_args"],
            },
        )
    if plan.num_ranks == 1 and kw["num_ranks"] is None:
        return None
    return plan


def _run_node(ctx: click.Context, kw: dict[str, Any], plan: Any) -> None:
    """Start the ranks of `plan`; exit as the exit-code table says."""
    from pipeline.launch import NodeRun

    kw["num_ranks"], kw["rank"] = plan.num_ranks, 0
    run_config(kw)  # every flag checked once here, before any rank starts
    from pipeline.storage.outpath import output_location

    out = output_location(kw["path"])  # a URL stays a URL (never a local folder 's3:')
    node = NodeRun(rank_flags(ctx), plan, out, kw["overwrite"], kw["progress_seconds"])
    with click_errors():
        code = node.run()
    if code:
        sys.exit(code)


# Not handed to the ranks --data-parallel starts: each gets its own rank, the launcher does
# --overwrite for all of them at once, and --config's values are handed on as flags.
_NOT_FOR_RANKS = (
    "data_parallel",
    "replicas_per_gpu",  # each replica slot's own flags say its share instead (Slot.flags)
    "num_ranks",
    "rank",
    "overwrite",
    "progress_fd",
)


def rank_flags(ctx: click.Context) -> list[str]:
    """Flags that give a rank this command's settings, from the command line and --config alike."""
    flags: list[str] = []
    for param, value in given_options(ctx, skip=_NOT_FOR_RANKS):
        flag = long_flag(param)
        if param.count:
            flags += [flag] * value
        elif param.is_flag:
            if value:
                flags.append(flag)
            elif value is False and param.secondary_opts:
                flags.append(param.secondary_opts[0])
        elif param.multiple:
            flags += [f"{flag}={v}" for v in value]
        elif value is not None:
            flags.append(f"{flag}={value}")
    return flags


def set_rank(kw: dict[str, Any]) -> Any:
    """--rank and --num-ranks: given together, else from a launcher (Slurm, torchrun, MPI, a
    Kubernetes Indexed Job), else rank 0 of 1. Returns where the rank came from."""
    with click_errors():
        rank = resolve_rank(kw["num_ranks"], kw["rank"])
    kw["rank"], kw["num_ranks"] = rank.rank, rank.num_ranks
    return rank
