"""`batchgen plan`: what `batchgen run` with these flags would do, without running it."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from pipeline.cli.common import click_errors, logs_to_stderr, setup_logging
from pipeline.cli.flags import config_option, run_config
from pipeline.cli.run import run_options, set_rank

PLAN_EPILOG = """\b
Examples:
  # what the sample job would do: prompts, error rows, tokens, the output-token ceiling
  batchgen plan --parquet data/prompts.parquet --prompt-column prompt --chat \\
      --max-tokens 128 --output out/sample
\b
  # every rank of a 4-rank job, with an ETA measured on this machine for 30 s
  batchgen plan --config jobs/examples/sample.toml --num-ranks 4 --rank 0 \\
      --all-ranks --calibrate 30
\b
Takes the flags of `batchgen run` (or its --config). Without --calibrate no engine starts;
the ETA then comes from the last run recorded in --output, or none is given.
Exit codes: 0 the job can run, 1 it cannot (the reason is printed), 2 bad usage.
"""


@click.command(epilog=PLAN_EPILOG)
@config_option()
@run_options
@click.option(
    "--all-ranks", is_flag=True, help="Plan every rank of --num-ranks, not only this one."
)
@click.option(
    "--calibrate",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Run the real engine on a sample of the prompts this long, for an ETA on this machine.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts.")
def plan(**kw: Any) -> None:
    """Say what `batchgen run` with these flags would do, without running it.

    Reads the input, renders and tokenizes every prompt as the run would, and reports prompts,
    rows already committed in --output, error rows by kind, prompt tokens, the output-token
    ceiling, and, when measured, the expected output tokens and an ETA.
    """
    verbose = kw.pop("verbose")
    setup_logging(verbose)
    kw["engine_log"] = verbose == 0  # --calibrate: vLLM's output to a log file, as in a run
    set_rank(kw)
    if kw["path"] is None:
        kw["path"] = ""  # plan without an output folder: nothing committed
    cfg = run_config(kw)
    from pipeline.plan import make_plan

    emit = click.echo
    if kw["as_json"] and kw["calibrate"]:
        logs_to_stderr()
        from pipeline.bench.machine import reserve_stdout

        emit = reserve_stdout()
    with click_errors():
        result = make_plan(cfg, all_ranks=kw["all_ranks"], calibrate=kw["calibrate"])
    emit(json.dumps(result.to_dict(), sort_keys=True) if kw["as_json"] else result.render())
    sys.exit(result.exit_code)
