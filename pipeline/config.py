"""The validated, frozen settings of one run. The CLI builds it; every other module only reads it."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import ConfigError
from pipeline.sampling import SamplingConfig


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """Where rows come from and how each gets its stable id."""

    parquet: str | None = None
    dataset: str | None = None
    data_files: tuple[str, ...] = ()
    config_name: str | None = None
    split: str = "train"
    revision: str | None = None
    # Streaming reads a hub dataset without downloading it first; every rank then reads the
    # whole stream and keeps every num_shards-th row, so prefer non-streaming for big arrays.
    streaming: bool = False
    id_column: str | None = None

    def __post_init__(self) -> None:
        if (self.parquet is None) == (self.dataset is None):
            raise ConfigError("give exactly one input: --parquet PATH or --dataset NAME_OR_DIR")
        if self.parquet is not None and (
            self.data_files or self.config_name or self.revision or self.streaming
        ):
            raise ConfigError(
                "--data-files, --config-name, --revision and --streaming apply to --dataset, "
                "not to --parquet"
            )


@dataclass(frozen=True, slots=True)
class PromptConfig:
    """How a row becomes a prompt."""

    prompt_column: str | None = None
    template: str | None = None
    messages_column: str | None = None
    chat: bool = False
    system_prompt: str | None = None
    chat_template: str | None = None  # path to a Jinja file replacing the model's own
    # Variables for the chat template (--chat-template-kwarg enable_thinking=false): they
    # change the prompt tokens, so they are part of the run's settings.
    chat_template_kwargs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
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

    @property
    def uses_chat_template(self) -> bool:
        return self.chat or self.messages_column is not None

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

    url: str  # the base URL of the OpenAI API, e.g. http://gpu7:8000/v1
    api_key_env: str = "OPENAI_API_KEY"
    tokenizer: str | None = None  # a local tokenizer folder; None: the model folder, else /tokenize
    prompt_form: str = "auto"  # one of PROMPT_FORMS; auto: token ids where the server takes them
    # Requests kept in flight come from --max-inflight; each transient failure (connection
    # refused or reset, timeout, HTTP 408, 429, 500, 502, 503, 504) is retried up to this many
    # times per row, waiting retry_backoff_seconds, doubled each time (with jitter), or the
    # server's Retry-After. More retries ride out longer hiccups; fewer turn a sick row into an
    # error row sooner.
    max_retries: int = 5
    retry_backoff_seconds: float = 1.0
    # A response slower than this is a timeout (retried). Generous: it bounds one whole
    # generation, which on a busy server can take minutes.
    request_timeout: float = 600.0
    # When no request has succeeded for this long (the server is gone), the run stops like a
    # graceful stop: it commits what finished and exits 75, instead of erroring every row.
    fail_seconds: float = 300.0

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

    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    model_impl: str = "transformers"
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_num_seqs: int | None = None
    enforce_eager: bool | None = (
        None  # None: on for CPU (compiling costs minutes there), off on GPU
    )
    trust_remote_code: bool = False
    seed: int = 0
    engine_args: tuple[tuple[str, Any], ...] = ()
    backend: str = "vllm"  # "fake": an instant engine for I/O, crash and scale tests
    server: ServerConfig | None = None  # generate on this server instead of in this process
    # LoRA adapters (name, absolute folder), served beside the base model.
    loras: tuple[tuple[str, str], ...] = ()
    # vLLM's reasoning parser: splits thinking from the answer, and makes structured output
    # apply to the answer only.
    reasoning_parser: str | None = None
    # vLLM's batch-invariant kernels (CUDA GPUs): a row's output no longer depends on its batch
    # neighbours, so a resumed bf16 run equals an uninterrupted one; slower.
    batch_invariant: bool = False

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

    path: str
    # Rows per Parquet shard. A shard is the unit of commit: smaller ones lose less work to a
    # crash and show progress sooner; larger ones make fewer files for readers.
    rows_per_shard: int = 10_000
    # Commit a partial shard after this many seconds, so a slow model still checkpoints often.
    checkpoint_seconds: float = 300.0
    keep_prompt: bool = False
    keep_columns: tuple[str, ...] = ()
    overwrite: bool = False
    # Write OUT/README.md, the dataset card, when the run finishes: `datasets.load_dataset(OUT)`
    # and `hf upload-large-folder` then take the folder as it is. Off by default because a
    # non-Parquet file beside the shards makes `pyarrow.parquet.read_table(OUT)` and
    # `pandas.read_parquet(OUT)` fail (they would need OUT/*.parquet); `batchgen card OUT`
    # writes it at any time.
    card: bool = False

    def __post_init__(self) -> None:
        from pipeline.storage import require_output_location  # a URL is never a local path

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
    # This process's rank and the run's rank count (the flags --shard-index / --num-shards,
    # spelled as `datasets` and datatrove users know them).
    num_ranks: int = 1
    rank: int = 0
    # On a stop signal, wait this long for requests already running before aborting them.
    drain_seconds: float = 30.0
    progress_seconds: float | None = None  # None: 0.5 s on a terminal, 30 s in a log
    # A rank started by --data-parallel sends its progress as JSON lines to this inherited file
    # descriptor, for the launcher's combined line, instead of printing its own (hidden flag).
    progress_fd: int | None = None
    # Requests kept inside the engine at once. More keeps the scheduler fed across long and
    # short sequences; fewer loses less queued work on a crash (queued work is only redone).
    max_inflight: int | None = None
    # Error rows are data and are always committed, but a run whose share of error rows is above
    # this ends with exit 1 (and, past 1,000 prompts at over 90%, stops early), so a cron job
    # does not report success for a run that produced mostly errors.
    max_error_rate: float = 0.1
    # vLLM's own log (its start-up chatter, its processes' warnings) goes to a file beside the
    # run's state instead of the terminal; batchgen -v shows it on the terminal instead.
    engine_log: bool = True
    # An input column naming each row's LoRA adapter (null: the base model).
    lora_column: str | None = None
    # Engine deaths (killed, out of memory, a CUDA error, an exception on a step) survived by
    # starting a new engine; past them the run stops, committed work kept, exit 1.
    engine_restarts: int = 2
    # A step that produces nothing for this long is a stall, handled like a death. Generous: a
    # step only waits this long when the engine is hung or stopped, never on long outputs.
    stall_seconds: float = 600.0

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ConfigError(f"--num-shards {self.num_ranks}: must be at least 1")
        if not 0 <= self.rank < self.num_ranks:
            raise ConfigError(
                f"--shard-index {self.rank}: must be in 0..{self.num_ranks - 1} "
                f"for --num-shards {self.num_ranks}"
            )
        if not 0 <= self.max_error_rate <= 1:
            raise ConfigError(
                f"--max-error-rate {self.max_error_rate}: must be a share in [0, 1], e.g. 0.1"
            )
        if self.lora_column is not None and not self.engine.loras:
            raise ConfigError("--lora-column needs the adapters it names: --lora NAME=PATH")
        if len(self.engine.loras) > 1 and self.lora_column is None:
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
        return Path(self.output.path)
