"""`batchgen tune`: the engine settings that run this job fastest here, on a sample of its rows.

Takes `batchgen run`'s flags plus its own, all generated from the config dataclasses (its own
are TuneConfig's fields, pipeline/config/tune.py).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from pipeline.cli.common import (
    Stopped,
    click_errors,
    close_engines_after,
    file_option,
    given_options,
    logs_to_stderr,
    long_flag,
    setup_logging,
    stop_raises,
)
from pipeline.cli.flags import build, config_option, declared, group_options, run_config
from pipeline.cli.run import data_parallel_option, verbose_option
from pipeline.config.tune import TuneConfig
from pipeline.errors import EXIT_INTERRUPTED

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
Exit codes: 0 done (also when nothing beat the baseline), 1 failed, 2 bad usage,
75 stopped by a signal (SIGTERM, SIGINT, SIGUSR1; during --verify the search's result is
still printed).
"""

# Options of the command, not of the job: --write-config does not write them.
_COMMAND_ONLY = ("write_config", "as_json", "verbose")
log = logging.getLogger("batchgen")


@click.command(epilog=TUNE_EXAMPLES)
@config_option("The job's TOML config, as for `batchgen run` (flags override it).")
@group_options("input", "prompt", "engine", "sampling", "output")
@data_parallel_option
@group_options("ranks")
@verbose_option
@group_options("tune")
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
    # Every option but tune's own is one of `batchgen run`'s and goes into the job config
    # --write-config writes.
    tune_only = (*(f.name for _, f, _ in declared("tune")), *_COMMAND_ONLY)
    job_keys = {
        long_flag(param)[2:]: list(value) if param.multiple else value
        for param, value in given_options(ctx, skip=tune_only)
    }
    setup_logging(kw.pop("verbose"))
    logs_to_stderr()
    # Tuning reads the start of the whole input and writes no output.
    kw["rank"], kw["num_ranks"] = 0, 1
    from pipeline import tune as tunemod
    from pipeline.bench import reserve_stdout, to_json

    cfg = build(TuneConfig, kw, run=run_config(kw))
    emit = reserve_stdout() if kw["as_json"] else click.echo
    with click_errors(), stop_raises():
        try:
            tuned = tunemod.run_tune(cfg)
        except Stopped as stop:
            close_engines_after(stop)
            log.warning("%s received during the search: stopped; nothing written (a tune "
                        "keeps no state: rerun it)", stop.name)  # fmt: skip
            sys.exit(EXIT_INTERRUPTED)
        report = tunemod.tune_report(cfg, tuned)
        if cfg.verify_rounds:
            verify = tunemod.Verify(cfg, tuned)
            try:
                report["verify"] = verify.run()
            except Stopped as stop:
                close_engines_after(stop)
                report["verify"] = verify.report()  # the rounds that ended before the stop
                done = len(verify.rounds)
                log.warning("%s received during --verify: stopped it after %d of %d round(s); "
                            "the search's result follows, with %s", stop.name, done,
                            cfg.verify_rounds, "those rounds" if done else "no verify")  # fmt: skip
                report["verify_stopped"] = stop.name
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
    if report.get("verify_stopped"):
        sys.exit(EXIT_INTERRUPTED)
