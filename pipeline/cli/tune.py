"""`batchgen tune`: the engine settings that run this job fastest here, on a sample of its rows.

Takes `batchgen run`'s flags (generated from the config dataclasses) plus its own, declared
here: pipeline/tune's TuneConfig is not (yet) a declare-once dataclass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pipeline.cli.common import (
    click_errors,
    file_option,
    given_options,
    logs_to_stderr,
    long_flag,
    setup_logging,
)
from pipeline.cli.flags import config_option, group_options, run_config
from pipeline.cli.run import data_parallel_option, verbose_option
from pipeline.options import key_values

TUNE_EXAMPLES = """\b
Examples:
  # the job's own config; write the fastest engine settings found as a new job config
  batchgen tune --config job.toml --budget-seconds 1800 --write-config job.tuned.toml
  batchgen run --config job.tuned.toml
\b
  # the same flags as `batchgen run` (no --output needed); only these values, as JSON
  batchgen tune --parquet data/prompts.parquet --prompt-column prompt --chat --max-tokens 64 \\
      --dtype float32 --try max_num_seqs=16 --try max_num_seqs=32 --json
\b
Exit codes: 0 done (also when nothing beat the baseline), 1 failed, 2 bad usage.
"""

# Options of `tune` itself; every other option is one of `batchgen run`'s and goes into the
# job config --write-config writes.
_TUNE_ONLY = (
    "sample",
    "repeats",
    "budget_seconds",
    "min_gain",
    "try_values",
    "allow_output_changes",
    "verify_rounds",
    "write_config",
    "as_json",
    "verbose",
)


@click.command(epilog=TUNE_EXAMPLES)
@config_option("The job's TOML config, as for `batchgen run` (flags override it).")
@group_options("input", "prompt", "engine", "sampling", "output")
@data_parallel_option
@group_options("ranks")
@verbose_option
@click.option(
    "--sample",
    type=int,
    help="Rows from the start of the input timed in every trial [default: 4 x the engine's "
    "max_num_seqs, at least 256, so each pass fills the engine and drains as the job does].",
)
@click.option(
    "--repeats",
    type=int,
    default=3,
    show_default=True,
    help="Timed passes per trial, after one untimed warm-up pass.",
)
@click.option(
    "--budget-seconds",
    type=float,
    default=1800.0,
    show_default=True,
    help="Start no trial that would end later (engine starts count; 0: no limit).",
)
@click.option(
    "--min-gain",
    type=float,
    default=0.03,
    show_default=True,
    help="Share by which a setting must beat the best so far (and beyond the passes' spread).",
)
@click.option(
    "--try",
    "try_values",
    multiple=True,
    metavar="KEY=VALUE",
    help="Try only these values (repeatable; JSON values), e.g. max_num_seqs=64.",
)
@click.option(
    "--allow-output-changes",
    is_flag=True,
    help="Accept a faster setting whose texts on the sample differ from the baseline's.",
)
@click.option(
    "--verify",
    "verify_rounds",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="ROUNDS",
    help="Then run the whole job with the baseline's and the winner's settings, alternating "
    "this many rounds on warm engines, and report both and each trial's error (0: skip).",
)
@file_option("--write-config", "Write the job config with the winning engine settings here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def tune(ctx: click.Context, **kw: Any) -> None:
    """Find the engine settings that run this job fastest here, on a sample of its rows.

    Takes the same input, prompt, engine and sampling flags as `batchgen run` (or its
    --config), times short trials of vLLM settings against the job's own (vLLM's defaults
    for whatever it leaves out), each on its own engine, and reports every trial's output tok/s,
    its spread and the gain; --write-config writes the winner as a job config.
    """
    job_keys = {
        long_flag(param)[2:]: list(value) if param.multiple else value
        for param, value in given_options(ctx, skip=_TUNE_ONLY)
    }
    setup_logging(kw.pop("verbose"))
    logs_to_stderr()
    # Tuning reads the start of the whole input and writes no output.
    kw["rank"], kw["num_ranks"] = 0, 1
    from pipeline import tune as tunemod
    from pipeline.bench import reserve_stdout, to_json

    with click_errors():
        cfg = tunemod.TuneConfig(
            run=run_config(kw),
            sample=kw["sample"],
            repeats=kw["repeats"],
            budget_seconds=kw["budget_seconds"],
            min_gain=kw["min_gain"],
            tries=_tries(kw["try_values"]),
            allow_output_changes=kw["allow_output_changes"],
            verify_rounds=kw["verify_rounds"],
        )
    emit = reserve_stdout() if kw["as_json"] else click.echo
    with click_errors():
        tuned = tunemod.run_tune(cfg)
        report = tunemod.tune_report(cfg, tuned)
        if cfg.verify_rounds:
            report["verify"] = tunemod.verify_tune(cfg, tuned)
    report["config_written"] = None
    if kw["write_config"]:
        path = Path(kw["write_config"])
        try:
            tunemod.write_job_config(path, job_keys, report)
        except OSError as exc:
            emit(to_json(report) if kw["as_json"] else tunemod.format_tune(report))
            raise click.ClickException(
                f"--write-config {path}: cannot write it ({exc.strerror}); the tune's results "
                "are above"
            ) from exc
        report["config_written"] = str(path)
    emit(to_json(report) if kw["as_json"] else tunemod.format_tune(report))


def _tries(values: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    try:
        return key_values("max_num_seqs=64")(values, "--try")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--try") from exc
