"""The validated, frozen settings of one run. The CLI builds it; every other module only reads it."""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

# Sampling knobs a model's generation_config.json may set; vLLM reads the same subset.
MODEL_DEFAULT_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
DEFAULT_MAX_TOKENS = 256
_GREEDY_N = (
    "--n {n} with greedy sampling (temperature 0) would repeat one text; "
    "pass --temperature above 0 or --n 1"
)


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

    def __post_init__(self) -> None:
        if self.backend not in ("vllm", "fake"):
            raise ConfigError(f"--engine {self.backend!r}: expected vllm or fake")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"--max-model-len {self.max_model_len}: must be at least 2")
        if self.tensor_parallel_size < 1:
            raise ConfigError("--tensor-parallel-size must be at least 1")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("--gpu-memory-utilization must be in (0, 1]")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ConfigError("--max-num-seqs must be at least 1")


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """Sampling flags as given; None means the model's generation_config, then vLLM's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    # Generate past the end-of-sequence token up to the max tokens: every output's length is
    # then fixed in advance, which a benchmark needs so that two runs do the same work.
    ignore_eos: bool = False
    # An integer input column with each row's own max tokens (a null falls back to
    # --max-tokens), so one run can mix short and long outputs.
    max_tokens_column: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"--max-tokens {self.max_tokens}: must be at least 1")
        if self.temperature is not None and self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature}: must be 0 (greedy) or more")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ConfigError(f"--min-p {self.min_p}: must be in [0, 1]")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ConfigError(f"--repetition-penalty {self.repetition_penalty}: must be above 0")
        if self.n < 1:
            raise ConfigError(f"--n {self.n}: must be at least 1")
        if self.n > 1 and self.temperature == 0:
            raise ConfigError(_GREEDY_N.format(n=self.n))

    def resolve(self, model_defaults: dict[str, Any]) -> dict[str, Any]:
        """The sampling actually used: flags, else the model's defaults, else vLLM's neutral ones.

        The result is what goes to the engine, into the fingerprint and into every shard's
        metadata, so the recorded sampling is the applied one whatever its source.
        """
        neutral = {
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
        }
        resolved: dict[str, Any] = {}
        for key in MODEL_DEFAULT_SAMPLING_KEYS:
            flag = getattr(self, key)
            value = flag if flag is not None else model_defaults.get(key, neutral[key])
            resolved[key] = value
        if resolved["top_k"] is None or resolved["top_k"] < 0:
            resolved["top_k"] = 0  # vLLM's "no top-k" is 0 (older releases also took -1)
        max_tokens = self.max_tokens or model_defaults.get("max_new_tokens") or DEFAULT_MAX_TOKENS
        resolved.update(max_tokens=int(max_tokens), stop=list(self.stop), n=self.n)
        # Recorded only when used, so the fingerprints of runs that never used them (and their
        # resumes) are unchanged.
        if self.ignore_eos:
            resolved["ignore_eos"] = True
        if self.max_tokens_column is not None:
            resolved["max_tokens_column"] = self.max_tokens_column
        if self.n > 1 and resolved["temperature"] == 0:
            raise ConfigError(_GREEDY_N.format(n=self.n))
        return resolved


@dataclass(frozen=True, slots=True)
class OutputConfig:
    """Where and how results are written."""

    output: str
    # Rows per Parquet shard. A shard is the unit of commit: smaller ones lose less work to a
    # crash and show progress sooner; larger ones make fewer files for readers.
    rows_per_shard: int = 10_000
    # Commit a partial shard after this many seconds, so a slow model still checkpoints often.
    checkpoint_seconds: float = 300.0
    keep_prompt: bool = False
    keep_columns: tuple[str, ...] = ()
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.rows_per_shard < 1:
            raise ConfigError(f"--rows-per-shard {self.rows_per_shard}: must be at least 1")
        if self.checkpoint_seconds <= 0:
            raise ConfigError("--checkpoint-seconds must be above 0")
        from pipeline.sinks import RESERVED_COLUMNS

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
    num_shards: int = 1
    shard_index: int = 0
    # On a stop signal, wait this long for requests already running before aborting them.
    drain_seconds: float = 30.0
    progress_seconds: float | None = None  # None: 0.5 s on a terminal, 30 s in a log
    # Requests kept inside the engine at once. More keeps the scheduler fed across long and
    # short sequences; fewer loses less queued work on a crash (queued work is only redone).
    max_inflight: int | None = None

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ConfigError(f"--num-shards {self.num_shards}: must be at least 1")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                f"--shard-index {self.shard_index}: must be in 0..{self.num_shards - 1} "
                f"for --num-shards {self.num_shards}"
            )
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ConfigError("--max-inflight must be at least 1")
        if self.source.id_column is not None and self.source.id_column in self.output.keep_columns:
            raise ConfigError(
                f"--keep-columns {self.source.id_column}: the --id-column is already written as 'id'"
            )

    @property
    def output_dir(self) -> Path:
        return Path(self.output.output)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)


def row_seed(run_seed: int, row_id: str) -> int:
    """The sampling seed of one row: fixed by the run seed and the row id alone, so a row's
    samples are the same whatever batch, rank or resume it lands in."""
    digest = hashlib.blake2b(f"{run_seed}\x00{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)
