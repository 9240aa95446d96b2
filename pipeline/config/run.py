"""Where results go (OutputConfig) and the whole run (RunConfig): ranks, restarts, error budget."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config.engine import EngineConfig
from pipeline.config.inputs import PromptConfig, SourceConfig
from pipeline.errors import ConfigError
from pipeline.options import comma_list, option
from pipeline.sampling import SamplingConfig


@dataclass(frozen=True, slots=True)
class OutputConfig:
    """Where and how results are written."""

    path: str = option(
        help="Output folder of Parquet shards (required).",
        flag="--output",
        aliases=("-o",),
        metavar="DIR",
        flag_default=None,
    )
    # Rows per Parquet shard. A shard is the unit of commit: smaller ones lose less work to a
    # crash and show progress sooner; larger ones make fewer files for readers.
    rows_per_shard: int = option(10_000, "Rows per shard; a shard is the unit of commit.")
    # Commit a partial shard after this many seconds, so a slow model still checkpoints often.
    checkpoint_seconds: float = option(300.0, "Commit a partial shard after this long.")
    keep_prompt: bool = option(False, "Write the rendered prompt as column 'prompt'.")
    keep_columns: tuple[str, ...] = option(
        (),
        "Comma-separated input columns to copy to the output.",
        metavar="COLS",
        parse=comma_list,
        flag_default=None,
    )
    overwrite: bool = option(False, "Discard earlier output in --output and start afresh.")
    # jsonl writes each committed shard again as part-R-S.jsonl beside its Parquet, which stays
    # what resume and batchgen's readers use (pipeline/jsonl.py): for small jobs and line tools;
    # it costs a second copy, and readers of the whole folder then glob by extension.
    format: str = option(
        "parquet",
        "jsonl: also write each committed shard as JSON Lines beside its Parquet file.",
        flag="--output-format",
        choices=("parquet", "jsonl"),
    )
    # Off by default: a non-Parquet file at OUT's top makes `pyarrow.parquet.read_table(OUT)`
    # and `pandas.read_parquet(OUT)` fail; `batchgen card OUT` writes it at any time.
    card: bool = option(
        False,
        "Write the dataset card OUT/README.md when the run finishes (datasets.load_dataset(OUT) "
        "and the Hub then take the folder as it is; pandas and pyarrow then read "
        "OUT/*/*.parquet, not OUT).",
    )

    def __post_init__(self) -> None:
        from pipeline.storage import require_output_location  # a URL is never a local path
        from pipeline.storage.urls import url_scheme

        if self.path is not None:  # tune's trials have none
            require_output_location(self.path)
            if self.format == "jsonl" and url_scheme(self.path) is not None:
                raise ConfigError(
                    f"--output-format jsonl with --output {self.path}: JSON Lines copies are "
                    "written beside local shards only; drop --output-format or write locally "
                    "and convert with `batchgen export`"
                )
        if self.rows_per_shard < 1:
            raise ConfigError(f"--rows-per-shard {self.rows_per_shard}: must be at least 1")
        if self.checkpoint_seconds <= 0:
            raise ConfigError("--checkpoint-seconds must be above 0")
        from pipeline.sinks import RESERVED_COLUMNS  # the sink owns the output schema

        clashes = [c for c in self.keep_columns if c in RESERVED_COLUMNS]
        if clashes:
            raise ConfigError(
                f"--keep-columns {', '.join(clashes)}: clashes with batchgen's own output "
                f"columns ({', '.join(RESERVED_COLUMNS)}); rename the input column first"
            )
        if len(set(self.keep_columns)) != len(self.keep_columns):
            raise ConfigError("--keep-columns lists a column twice")


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything one `batchgen run` needs; validated on construction."""

    source: SourceConfig
    prompt: PromptConfig
    engine: EngineConfig
    sampling: SamplingConfig
    output: OutputConfig
    # The run's rank count and this process's rank. Not given: from the launcher (Slurm,
    # torchrun, MPI, a Kubernetes Indexed Job), else rank 0 of 1 (see pipeline.ranks).
    # --num-shards / --shard-index are their old names, still accepted.
    num_ranks: int = option(
        1,
        "Split the input into this many ranks [default: from the launcher, else 1].",
        aliases=("--num-shards",),
        flag_default=None,
    )
    rank: int = option(
        0,
        "This process's rank [default: from Slurm, torchrun, MPI or a Kubernetes "
        "Indexed Job, else 0].",
        aliases=("--shard-index",),
        flag_default=None,
    )
    # On a stop signal, wait this long for requests already running before aborting them.
    drain_seconds: float = option(
        30.0, "On SIGTERM/SIGINT/SIGUSR1, let running requests finish this long."
    )
    # Requests kept inside the engine at once. More keeps the scheduler fed across long and
    # short sequences; fewer loses less queued work on a crash (queued work is only redone).
    max_inflight: int | None = option(
        None, "Requests kept in the engine [default: 4 x max-num-seqs]."
    )
    # Rows read ahead and admitted in the order of their prompt tokens, so prompts sharing a long
    # prefix run together and vLLM's prefix cache serves them (pipeline/admission.py); 0: input
    # order. Speed only: not part of the fingerprint.
    group_prefixes: int = option(
        0,
        "Admit rows in windows of N, each in the order of its prompt tokens, so prompts that "
        "share a prefix (several questions over one document) hit the prefix cache [default: "
        "0, input order].",
        metavar="N",
    )
    # Engine deaths (killed, out of memory, a CUDA error, an exception on a step) survived by
    # starting a new engine; past them the run stops, committed work kept, exit 1.
    engine_restarts: int = option(
        2, "Engine deaths (killed, out of memory, crash) survived by restarting it."
    )
    # A step that produces nothing for this long is a stall, handled like a death. Generous: a
    # step only waits this long when the engine is hung or stopped, never on long outputs.
    stall_seconds: float = option(
        600.0, "A step producing nothing this long is a stall, handled like a death."
    )
    # Error rows are data and are always committed, but a run whose share of error rows is above
    # this ends with exit 1 (and, past 1,000 prompts at over 90%, stops early), so a cron job
    # does not report success for a run that produced mostly errors.
    max_error_rate: float = option(
        0.1, "Exit 1 if more than this share of prompts became error rows (all are committed)."
    )
    progress_seconds: float | None = option(
        None,  # 0.5 s on a terminal, 30 s in a log
        help="Progress line interval [default: 0.5 s on a terminal, 30 s in logs].",
    )
    # A rank started by --data-parallel sends its progress as JSON lines to this inherited file
    # descriptor, for the launcher's combined line, instead of printing its own (hidden flag).
    progress_fd: int | None = option(None, "", hidden=True)
    # node_exporter's textfile collector reads DIR/*.prom: each rank writes its own file there
    # (pipeline/metrics.py), atomically, every 10 s and at its end.
    metrics_textfile: str | None = option(
        None,
        "Write this rank's Prometheus metrics to DIR/batchgen_rank_RRRRR.prom (node_exporter "
        "textfile collector); see docs/scale.md.",
        metavar="DIR",
    )
    # An input column naming each row's LoRA adapter (null: the base model).
    lora_column: str | None = option(
        None,
        "Column naming each row's --lora adapter (null: the base model).",
        group="sampling",
        metavar="COL",
    )
    # vLLM's own log (its start-up chatter, its processes' warnings) goes to a file beside the
    # run's state instead of the terminal; batchgen -v shows it on the terminal instead.
    engine_log: bool = True
    # Earlier output folders (--reuse, repeatable): a row whose identical request is committed
    # in one of them takes its outputs from there instead of the engine. Costs one pass over
    # their key indexes at the start (about 24 bytes of disk per earlier prompt, under
    # OUT/.batchgen while the run lasts); a folder made with other settings reuses nothing.
    reuse: tuple[str, ...] = option(
        (),
        "An earlier output folder (repeatable): rows whose identical request is committed "
        "there take its outputs instead of being generated.",
        group="output",
        metavar="DIR",
        multiple=True,
    )

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ConfigError(f"--num-ranks {self.num_ranks}: must be at least 1")
        if not 0 <= self.rank < self.num_ranks:
            raise ConfigError(
                f"--rank {self.rank}: must be in 0..{self.num_ranks - 1} "
                f"for --num-ranks {self.num_ranks}"
            )
        if not 0 <= self.max_error_rate <= 1:
            raise ConfigError(
                f"--max-error-rate {self.max_error_rate}: must be a share in [0, 1], e.g. 0.1"
            )
        if self.lora_column is not None and self.prompt.request_column is not None:
            raise ConfigError(
                "--lora-column: with --openai-batch each line's body.model names its adapter; "
                "drop --lora-column"
            )
        if self.lora_column is not None and not self.engine.loras:
            raise ConfigError("--lora-column needs the adapters it names: --lora NAME=PATH")
        per_row = self.lora_column is not None or self.prompt.request_column is not None
        if len(self.engine.loras) > 1 and not per_row:
            names = ", ".join(n for n, _ in self.engine.loras)
            raise ConfigError(
                f"--lora {names}: with several adapters, name each row's adapter with "
                "--lora-column COL (one adapter alone applies to every row)"
            )
        if self.engine_restarts < 0:
            raise ConfigError(f"--engine-restarts {self.engine_restarts}: must be 0 or more")
        if self.stall_seconds <= 0:
            raise ConfigError(f"--stall-seconds {self.stall_seconds:g}: must be above 0")
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ConfigError("--max-inflight must be at least 1")
        if self.group_prefixes < 0:
            raise ConfigError(
                f"--group-prefixes {self.group_prefixes}: give a window of rows (e.g. 4096), "
                "or 0 for input order"
            )
        if self.source.id_column is not None and self.source.id_column in self.output.keep_columns:
            raise ConfigError(
                f"--keep-columns {self.source.id_column}: the --id-column is already written as 'id'"
            )

    @property
    def output_dir(self) -> Path:
        """OUT: a local Path, or a StorePath for an object-store URL (same interface)."""
        from pipeline.storage.outpath import output_location

        return output_location(self.output.path)
