"""The validated, frozen settings of one run. The CLI builds it; every other module only reads it."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.adapters import parse_lora_flags
from pipeline.errors import ConfigError
from pipeline.options import comma_list, key_value_option, option
from pipeline.sampling import SamplingConfig


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """Where rows come from and how each gets its stable id."""

    parquet: str | None = option(None, "Parquet file, folder (recursive) or glob.", metavar="PATH")
    # A batch request file (OpenAI Batch API / vllm run-batch, or Anthropic Message Batches
    # JSONL): each line's custom_id is the row id, its body the prompt and its own settings.
    openai_batch: str | None = option(
        None,
        "Batch request JSONL (OpenAI / vllm run-batch / Anthropic): file, folder or glob; "
        "see docs/openai-batch.md.",
        metavar="PATH",
    )
    dataset: str | None = option(
        None,
        "HF hub id, local dataset folder (save_to_disk or data files), or builder name "
        "(json, csv, parquet, text) with --data-files.",
        metavar="NAME",
    )
    data_files: tuple[str, ...] = option(
        (), "Data files for --dataset; repeatable, globs ok.", metavar="PATH", multiple=True
    )
    config_name: str | None = option(
        None, "Dataset configuration (subset) for --dataset.", metavar="NAME"
    )
    split: str = option("train", "Split of --dataset.")
    revision: str | None = option(None, "Hub revision of --dataset.", metavar="REV")
    # Streaming reads a hub dataset without downloading it first; every rank then reads the
    # whole stream and keeps every num_ranks-th row, so prefer non-streaming for big arrays.
    streaming: bool = option(False, "Stream --dataset instead of preparing it first.")
    id_column: str | None = option(
        None,
        "Unique row ids from this column [default: file:row or split:row position].",
        metavar="COL",
    )
    # A plain file, folder-free glob or list of files whose format its extension names
    # (.parquet, .jsonl/.json, .csv); mapped onto --parquet or the `datasets` builder.
    input: str | None = option(
        None,
        "Input file or glob; its extension names the format (.parquet, .jsonl, .json, .csv).",
        metavar="PATH",
    )
    # Only the first N rows of this rank's slice (a quick try); not part of the run's settings,
    # so a later run without it resumes and does the rest.
    limit: int | None = option(
        None,
        "Only the first N rows of the input (of this rank): a quick try; a later run "
        "without --limit does the rest.",
        metavar="N",
    )

    def __post_init__(self) -> None:
        if self.input is not None:
            if any(v is not None for v in (self.parquet, self.dataset, self.openai_batch)):
                raise ConfigError(
                    "give one input: --input, --parquet, --dataset or --openai-batch, not two"
                )
            builder = input_builder(self.input)
            if builder == "parquet":
                object.__setattr__(self, "parquet", self.input)
            else:
                object.__setattr__(self, "dataset", builder)
                object.__setattr__(self, "data_files", (self.input,))
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit {self.limit}: give a number of rows, 1 or more")
        inputs = [v for v in (self.parquet, self.dataset, self.openai_batch) if v is not None]
        if len(inputs) != 1:
            raise ConfigError(
                "give exactly one input: --input PATH, --parquet PATH, --dataset NAME_OR_DIR or "
                "--openai-batch FILE.jsonl"
            )
        if self.openai_batch is not None and self.id_column is not None:
            raise ConfigError(
                "--id-column: with --openai-batch each line's custom_id is the row id; drop it"
            )
        if self.parquet is not None and (
            self.data_files or self.config_name or self.revision or self.streaming
        ):
            raise ConfigError(
                "--data-files, --config-name, --revision and --streaming apply to --dataset, "
                "not to --parquet"
            )

    @property
    def label(self) -> str:
        """The input as plan and report lines name it: the files, not a builder's name."""
        if self.parquet is not None:
            return self.parquet
        if self.dataset in INPUT_FORMATS.values() and self.data_files:
            return ", ".join(self.data_files)
        return str(self.dataset)


# File extensions --input reads, and the `datasets` builder (or Parquet reader) of each.
INPUT_FORMATS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".csv": "csv",
}


def input_builder(path: str) -> str:
    """The reader of an --input path, from its extension (a glob's pattern included)."""
    name = path.rstrip("/").lower()
    for extension in sorted(INPUT_FORMATS, key=len, reverse=True):
        if name.endswith(extension):
            return INPUT_FORMATS[extension]
    raise ConfigError(
        f"--input {path}: cannot tell its format from the extension; --input reads "
        f"{', '.join(INPUT_FORMATS)} files (globs ok); for other inputs use --dataset "
        "NAME_OR_DIR (a Hub id, a dataset folder, or a `datasets` builder with --data-files)"
    )


@dataclass(frozen=True, slots=True)
class PromptConfig:
    """How a row becomes a prompt."""

    prompt_column: str | None = option(None, "Column holding the prompt text.", metavar="COL")
    template: str | None = option(
        None, "Prompt built from columns, e.g. 'Summarize:\\n{text}'.", metavar="TEXT"
    )
    messages_column: str | None = option(
        None, "Column of chat messages [{role, content}, ...].", metavar="COL"
    )
    chat: bool = option(False, "Send the prompt as one user message through the chat template.")
    system_prompt: str | None = option(
        None, "System message for --chat / --messages-column.", metavar="TEXT"
    )
    chat_template: str | None = option(
        None, "Jinja chat template replacing the model's own.", metavar="FILE"
    )
    # Variables for the chat template (--chat-template-kwarg enable_thinking=false): they
    # change the prompt tokens, so they are part of the run's settings.
    chat_template_kwargs: tuple[tuple[str, Any], ...] = key_value_option(
        "A variable for the chat template, e.g. enable_thinking=false; JSON values.",
        "--chat-template-kwarg",
        "enable_thinking=false",
    )
    # A column of whole requests (set by --openai-batch, never a flag of its own): each row's
    # messages or prompt text, the model it names, or why it cannot be served.
    request_column: str | None = None

    def __post_init__(self) -> None:
        if self.request_column is not None:
            self._check_requests()
            return
        given = [
            name
            for name, value in (
                ("--prompt-column", self.prompt_column),
                ("--template", self.template),
                ("--messages-column", self.messages_column),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ConfigError(
                "give exactly one of --prompt-column, --template or --messages-column"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.messages_column is not None and self.chat:
            raise ConfigError(
                "--messages-column is always rendered with the chat template; drop --chat"
            )
        if self.system_prompt is not None and not self.uses_chat_template:
            raise ConfigError("--system-prompt needs --chat or --messages-column")
        if self.chat_template is not None and not self.uses_chat_template:
            raise ConfigError("--chat-template needs --chat or --messages-column")
        if self.chat_template_kwargs and not self.uses_chat_template:
            raise ConfigError("--chat-template-kwarg needs --chat or --messages-column")
        if self.template is not None:
            self.template_fields()  # raises on a malformed template

    def _check_requests(self) -> None:
        """With --openai-batch each line gives its prompt: refuse the flags that would too."""
        given = [
            flag
            for flag, value in (
                ("--prompt-column", self.prompt_column),
                ("--template", self.template),
                ("--messages-column", self.messages_column),
                ("--chat", self.chat or None),
            )
            if value is not None
        ]
        if given:
            raise ConfigError(
                f"{', '.join(given)}: with --openai-batch each line's body gives the prompt "
                "(messages: chat template; prompt: as is); drop them"
            )

    @property
    def uses_chat_template(self) -> bool:
        return self.chat or self.messages_column is not None or self.request_column is not None

    def template_fields(self) -> list[str]:
        """Column names a --template refers to, in order of first use."""
        assert self.template is not None
        fields: list[str] = []
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as exc:
            raise ConfigError(
                f"--template {self.template!r} is not a valid format string ({exc}); "
                "write literal braces as {{ and }}"
            ) from exc
        for _, name, _, _ in parsed:
            if name is None:
                continue
            if name == "" or not name.isidentifier() and not name.replace("-", "_").isidentifier():
                raise ConfigError(
                    f"--template field {{{name}}} must name a column, e.g. {{text}}; "
                    "write literal braces as {{ and }}"
                )
            if name not in fields:
                fields.append(name)
        if not fields:
            raise ConfigError(
                "--template names no column; use e.g. --template 'Summarize:\\n{text}'"
            )
        return fields


# Prompt forms a server can be sent (--prompt-form): token ids on the completions endpoint (what
# vLLM accepts: the prompt is exactly what batchgen rendered and counted), the rendered text on
# the completions endpoint, or the messages on the chat endpoint (the server renders them).
PROMPT_FORMS = ("auto", "token_ids", "text", "chat")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """An OpenAI-compatible server (`vllm serve`) that generates instead of an in-process engine.

    The API key is never held here: only the name of the environment variable it is read from,
    so no config, fingerprint or log can carry it.
    """

    # the base URL of the OpenAI API, e.g. http://gpu7:8000/v1
    url: str = option(
        help="Generate on this OpenAI-compatible server (vllm serve) instead of in this "
        "process; its base URL, e.g. http://gpu7:8000/v1. --model then names the served model.",
        flag="--server",
        metavar="URL",
        flag_default=None,
    )
    # a local tokenizer folder; None: the model folder, else the server's /tokenize
    tokenizer: str | None = option(
        None,
        "With --server: the model's tokenizer folder [default: the model folder when it is "
        "on this machine, else the server's /tokenize].",
        metavar="PATH",
    )
    api_key_env: str = option(
        "OPENAI_API_KEY",
        "With --server: the environment variable holding the API key (never logged).",
        metavar="NAME",
    )
    prompt_form: str = option(
        "auto",
        "With --server: send token ids, the rendered text, or chat messages [auto: token "
        "ids where the server takes them].",
        choices=PROMPT_FORMS,
    )
    # Requests kept in flight come from --max-inflight; each transient failure (connection
    # refused or reset, timeout, HTTP 408, 429, 500, 502, 503, 504) is retried up to this many
    # times per row, waiting retry_backoff_seconds, doubled each time (with jitter), or the
    # server's Retry-After. More retries ride out longer hiccups; fewer turn a sick row into an
    # error row sooner.
    max_retries: int = option(
        5,
        "With --server: retries per row of a transient failure (refused or reset "
        "connection, timeout, HTTP 408/429/5xx).",
    )
    retry_backoff_seconds: float = option(
        1.0,
        "With --server: the first retry's wait, doubled each time (jittered; the "
        "server's Retry-After wins).",
    )
    # A response slower than this is a timeout (retried). Generous: it bounds one whole
    # generation, which on a busy server can take minutes.
    request_timeout: float = option(
        600.0, "With --server: seconds one request may take before it is retried."
    )
    # When no request has succeeded for this long (the server is gone), the run stops like a
    # graceful stop: it commits what finished and exits 75, instead of erroring every row.
    fail_seconds: float = option(
        300.0,
        "With --server: when no request succeeds for this long, stop, commit and exit 75.",
        flag="--server-fail-seconds",
    )

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"--server {self.url!r}: expected the server's base URL, e.g. http://gpu7:8000/v1"
            )
        if parts.username is not None or parts.password is not None:
            raise ConfigError(
                "--server: the URL carries credentials; give the URL without them and the key "
                "in the environment variable named by --api-key-env"
            )
        if not self.api_key_env or not self.api_key_env.replace("_", "").isalnum():
            raise ConfigError(
                f"--api-key-env {self.api_key_env!r}: expected an environment variable name, "
                "e.g. OPENAI_API_KEY"
            )
        if self.prompt_form not in PROMPT_FORMS:
            raise ConfigError(
                f"--prompt-form {self.prompt_form!r}: expected one of {', '.join(PROMPT_FORMS)}"
            )
        if self.max_retries < 0:
            raise ConfigError(f"--max-retries {self.max_retries}: must be 0 or more")
        if self.retry_backoff_seconds < 0:
            raise ConfigError("--retry-backoff-seconds must be 0 or more")
        if self.request_timeout <= 0:
            raise ConfigError("--request-timeout must be above 0")
        if self.fail_seconds <= 0:
            raise ConfigError("--server-fail-seconds must be above 0")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the vLLM engine is built. None means: let vLLM (or the platform rule) decide."""

    model: str | None = option(
        None,  # the bundled SmolLM2-135M-Instruct
        help="Model folder or hub id [default: bundled SmolLM2-135M-Instruct].",
        metavar="PATH_OR_ID",
    )
    model_impl: str = option(
        "transformers", "vLLM model implementation: transformers, vllm or auto."
    )
    dtype: str = option("auto", "Weights dtype (auto, bfloat16, float16, float32).")
    max_model_len: int | None = option(
        None, "Context length (prompt + output) [default: the model's]."
    )
    tensor_parallel_size: int = option(1, "GPUs per model replica.")
    gpu_memory_utilization: float | None = option(None, "Share of GPU memory vLLM may use.")
    max_num_seqs: int | None = option(None, "Sequences the engine runs at once.")
    # None: on for CPU (compiling costs minutes there), off on GPU
    enforce_eager: bool | None = option(
        None, "Skip graphs/compilation [default: on for CPU, off on GPU].", negatable=True
    )
    trust_remote_code: bool = option(False, "Allow model code from the model's repo.")
    engine_args: tuple[tuple[str, Any], ...] = key_value_option(
        "Any other vllm.LLM argument; JSON values.", "--engine-arg", "enable_prefix_caching=true"
    )
    # "fake": an instant engine for I/O, crash and scale tests (a hidden flag)
    backend: str = option("vllm", "", flag="--engine", choices=("vllm", "fake"), hidden=True)
    # LoRA adapters (name, absolute folder), served beside the base model.
    loras: tuple[tuple[str, str], ...] = option(
        (),
        "A LoRA adapter (PEFT folder) to serve beside the base model; repeatable.",
        flag="--lora",
        metavar="NAME=PATH",
        multiple=True,
        parse=lambda values, _flag: parse_lora_flags(values),
    )
    # vLLM's batch-invariant kernels (CUDA GPUs): a row's output no longer depends on its batch
    # neighbours, so a resumed bf16 run equals an uninterrupted one; slower.
    batch_invariant: bool = option(
        False,
        "vLLM's batch-invariant kernels (GPU): outputs independent of batch neighbours, "
        "so a resumed bf16 run equals an uninterrupted one; slower.",
    )
    # vLLM's reasoning parser: splits thinking from the answer, and makes structured output
    # apply to the answer only.
    reasoning_parser: str | None = option(
        None,
        "vLLM reasoning parser (e.g. deepseek_r1, qwen3): thinking goes to column "
        "'reasoning', the answer to 'text'.",
        metavar="NAME",
    )
    # The run seed; listed with the sampling flags, as each row's sampling seed derives from it.
    seed: int = option(
        0, "Run seed; each row's seed derives from it and the row id.", group="sampling"
    )
    server: ServerConfig | None = None  # generate on this server instead of in this process

    def __post_init__(self) -> None:
        if self.backend not in ("vllm", "fake"):
            raise ConfigError(f"--engine {self.backend!r}: expected vllm or fake")
        if self.server is not None:
            self._check_server_flags()
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"--max-model-len {self.max_model_len}: must be at least 2")
        if self.tensor_parallel_size < 1:
            raise ConfigError("--tensor-parallel-size must be at least 1")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("--gpu-memory-utilization must be in (0, 1]")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ConfigError("--max-num-seqs must be at least 1")

    def _check_server_flags(self) -> None:
        """With --server, the server's own flags decide how the model runs: refuse ours."""
        defaults = EngineConfig()
        given = [
            "--" + name.replace("_", "-")
            for name in (
                "model_impl",
                "dtype",
                "max_model_len",
                "tensor_parallel_size",
                "gpu_memory_utilization",
                "max_num_seqs",
                "enforce_eager",
            )
            if getattr(self, name) != getattr(defaults, name)
        ]
        if self.engine_args:
            given.append("--engine-arg")
        if self.backend != "vllm":
            given.append("--engine")
        if self.loras:
            raise ConfigError(
                "--lora: with --server the server holds the adapters; start it with "
                "`vllm serve MODEL --enable-lora --lora-modules NAME=PATH` and pass --model NAME "
                "(one adapter per run), or drop --server to serve several adapters in one run"
            )
        if self.reasoning_parser is not None:
            raise ConfigError(
                "--reasoning-parser: batchgen sends token ids to the completions endpoint, which "
                "does not split reasoning; drop --server to split it in process, or drop "
                "--reasoning-parser and split the text yourself"
            )
        if self.batch_invariant:
            given.append("--batch-invariant")
        if given:
            raise ConfigError(
                f"{', '.join(given)}: engine settings of the in-process engine; with --server "
                "the server's own flags decide them (e.g. vllm serve MODEL --model-impl "
                "transformers --dtype float32 --max-model-len 4096); drop them here"
            )


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

        if self.path is not None:  # tune's trials have none
            require_output_location(self.path)
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
        if self.source.id_column is not None and self.source.id_column in self.output.keep_columns:
            raise ConfigError(
                f"--keep-columns {self.source.id_column}: the --id-column is already written as 'id'"
            )

    @property
    def output_dir(self) -> Path:
        """OUT: a local Path, or a StorePath for an object-store URL (same interface)."""
        from pipeline.storage.outpath import output_location

        return output_location(self.output.path)
