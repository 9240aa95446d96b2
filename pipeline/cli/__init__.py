"""The `batchgen` command: one module per subcommand, flags generated from the config dataclasses.

  flags.py    the flags of every config field (pipeline.options), --config files, configs built
              back from the parsed flags
  common.py   logging set-up, library errors as click errors, the options a user gave
  run.py      batchgen run (and --data-parallel)     plan.py    batchgen plan
  bench.py    batchgen bench                         tune.py    batchgen tune
  status.py   batchgen status                        show.py    batchgen show
  report.py   batchgen report                        model.py   batchgen model prepare
  card.py     batchgen card (the dataset card OUT/README.md)
  export.py   batchgen export (OpenAI batch output lines)
  trial.py    batchgen try "prompt": one completion printed

Each command checks its flags, builds the config and calls one library function; heavy modules
(vllm, torch, datasets, transformers) are imported only inside commands, so `batchgen --help`
answers at once.
"""

from __future__ import annotations

import click

from pipeline.cli import bench, card, export, model, plan, report, run, show, status, trial, tune
from pipeline.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="batchgen")
def main() -> None:
    """batchgen: run an LLM over a dataset, offline and resumably.

    Streams prompts from Hugging Face datasets or Parquet into vLLM (Transformers modeling
    backend) in large continuous batches, and writes completions as sharded Parquet with
    resume checkpoints. `batchgen run --help` lists every flag, with examples.
    """


for _command in (
    run.run,
    model.model,
    bench.bench,
    tune.tune,
    status.status,
    plan.plan,
    show.show,
    report.report,
    card.card,
    export.export,
    trial.try_prompt,
):
    main.add_command(_command)
