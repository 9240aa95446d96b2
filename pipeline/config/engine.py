"""How generation runs: the in-process vLLM engine (EngineConfig) or a server (ServerConfig)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pipeline.adapters import parse_lora_flags
from pipeline.errors import ConfigError
from pipeline.options import key_value_option, option

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
