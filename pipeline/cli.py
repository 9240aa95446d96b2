"""The `batchgen` command. Parses flags into a RunConfig and calls the runner; nothing else.

Heavy modules (vllm, torch, datasets, transformers) are imported only inside commands, so
`batchgen --help` answers at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tomllib
from collections.abc import Callable
from typing import Any

import click

from pipeline import __version__
from pipeline.errors import EXIT_INTERRUPTED, BatchgenError, ConfigError
from pipeline.ranks import launcher_rank, resolve_rank
from pipeline.sampling import SAMPLING_OPTIONS, SamplingOption

log = logging.getLogger("batchgen")

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


def _setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s batchgen: %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    log.propagate = False
    if verbose == 0:
        # vLLM logs every engine detail at INFO; keep a batch job's log about the batch.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="batchgen")
def main() -> None:
    """batchgen: run an LLM over a dataset, offline and resumably.

    Streams prompts from Hugging Face datasets or Parquet into vLLM (Transformers modeling
    backend) in large continuous batches, and writes completions as sharded Parquet with
    resume checkpoints. `batchgen run --help` lists every flag, with examples.
    """


def _load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """--config FILE: a TOML file whose keys are long flag names; flags on the command line win."""
    if value is None:
        return None
    try:
        with open(value, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {value}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{value} is not valid TOML: {exc}") from exc
    # Keyed by long flag name, not parameter name: `--engine` is stored as `backend`.
    flags: dict[str, click.Option] = {
        opt[2:]: p
        for p in ctx.command.params
        if isinstance(p, click.Option) and p.name != "config"
        for opt in p.opts
        if opt.startswith("--")
    }
    defaults: dict[str, Any] = {}
    for key, item in data.items():
        param = flags.get(key.replace("_", "-"))
        if param is None:
            valid = ", ".join(sorted(flags))
            raise click.BadParameter(f"{value}: unknown key {key!r}; valid keys are: {valid}")
        if param.multiple and not isinstance(item, list):
            item = [item]
        defaults[param.name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _key_values(
    values: tuple[str, ...], flag: str = "--engine-arg", example: str = "enable_prefix_caching=true"
) -> tuple[tuple[str, Any], ...]:
    """KEY=VALUE flags, values parsed as JSON where they parse (`true`, `0.5`, `{...}`)."""
    parsed = []
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(
                f"{item!r}: expected KEY=VALUE, e.g. {flag} {example}", param_hint=flag
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        parsed.append((key.replace("-", "_"), value))
    return tuple(parsed)


def _options(*decorators: Callable) -> Callable:
    def wrap(f: Callable) -> Callable:
        for d in reversed(decorators):
            f = d(f)
        return f

    return wrap


input_options = _options(
    click.option("--parquet", metavar="PATH", help="Parquet file, folder (recursive) or glob."),
    click.option(
        "--dataset",
        metavar="NAME",
        help="HF hub id, local dataset folder "
        "(save_to_disk or data files), or builder name (json, csv, parquet) with --data-files.",
    ),
    click.option(
        "--data-files",
        multiple=True,
        metavar="PATH",
        help="Data files for --dataset; repeatable, globs ok.",
    ),
    click.option(
        "--config-name", metavar="NAME", help="Dataset configuration (subset) for --dataset."
    ),
    click.option("--split", default="train", show_default=True, help="Split of --dataset."),
    click.option("--revision", metavar="REV", help="Hub revision of --dataset."),
    click.option(
        "--streaming", is_flag=True, help="Stream --dataset instead of preparing it first."
    ),
    click.option(
        "--id-column",
        metavar="COL",
        help="Unique row ids from this column [default: file:row or split:row position].",
    ),
)

prompt_options = _options(
    click.option("--prompt-column", metavar="COL", help="Column holding the prompt text."),
    click.option(
        "--template", metavar="TEXT", help="Prompt built from columns, e.g. 'Summarize:\\n{text}'."
    ),
    click.option(
        "--messages-column", metavar="COL", help="Column of chat messages [{role, content}, ...]."
    ),
    click.option(
        "--chat",
        is_flag=True,
        help="Send the prompt as one user message through the chat template.",
    ),
    click.option(
        "--system-prompt", metavar="TEXT", help="System message for --chat / --messages-column."
    ),
    click.option(
        "--chat-template", metavar="FILE", help="Jinja chat template replacing the model's own."
    ),
    click.option(
        "--chat-template-kwarg",
        multiple=True,
        metavar="KEY=VALUE",
        help="A variable for the chat template, e.g. enable_thinking=false; JSON values.",
    ),
)

engine_options = _options(
    click.option(
        "--model",
        metavar="PATH_OR_ID",
        help="Model folder or hub id [default: bundled SmolLM2-135M-Instruct].",
    ),
    click.option(
        "--model-impl",
        default="transformers",
        show_default=True,
        help="vLLM model implementation: transformers, vllm or auto.",
    ),
    click.option(
        "--dtype",
        default="auto",
        show_default=True,
        help="Weights dtype (auto, bfloat16, float16, float32).",
    ),
    click.option(
        "--max-model-len", type=int, help="Context length (prompt + output) [default: the model's]."
    ),
    click.option(
        "--tensor-parallel-size",
        type=int,
        default=1,
        show_default=True,
        help="GPUs per model replica.",
    ),
    click.option("--gpu-memory-utilization", type=float, help="Share of GPU memory vLLM may use."),
    click.option("--max-num-seqs", type=int, help="Sequences the engine runs at once."),
    click.option(
        "--enforce-eager/--no-enforce-eager",
        default=None,
        help="Skip graphs/compilation [default: on for CPU, off on GPU].",
    ),
    click.option(
        "--trust-remote-code", is_flag=True, help="Allow model code from the model's repo."
    ),
    click.option(
        "--engine-arg",
        multiple=True,
        metavar="KEY=VALUE",
        help="Any other vllm.LLM argument; JSON values.",
    ),
    click.option(
        "--engine", "backend", type=click.Choice(["vllm", "fake"]), default="vllm", hidden=True
    ),
    click.option(
        "--lora",
        multiple=True,
        metavar="NAME=PATH",
        help="A LoRA adapter (PEFT folder) to serve beside the base model; repeatable.",
    ),
    click.option(
        "--batch-invariant",
        is_flag=True,
        help="vLLM's batch-invariant kernels (GPU): outputs independent of batch neighbours, "
        "so a resumed bf16 run equals an uninterrupted one; slower.",
    ),
    click.option(
        "--reasoning-parser",
        metavar="NAME",
        help="vLLM reasoning parser (e.g. deepseek_r1, qwen3): thinking goes to column "
        "'reasoning', the answer to 'text'.",
    ),
)


server_options = _options(
    click.option(
        "--server",
        metavar="URL",
        help="Generate on this OpenAI-compatible server (vllm serve) instead of in this "
        "process; its base URL, e.g. http://gpu7:8000/v1. --model then names the served model.",
    ),
    click.option(
        "--tokenizer",
        metavar="PATH",
        help="With --server: the model's tokenizer folder [default: the model folder when it is "
        "on this machine, else the server's /tokenize].",
    ),
    click.option(
        "--api-key-env",
        metavar="NAME",
        default="OPENAI_API_KEY",
        show_default=True,
        help="With --server: the environment variable holding the API key (never logged).",
    ),
    click.option(
        "--prompt-form",
        type=click.Choice(["auto", "token_ids", "text", "chat"]),
        default="auto",
        show_default=True,
        help="With --server: send token ids, the rendered text, or chat messages [auto: token "
        "ids where the server takes them].",
    ),
    click.option(
        "--max-retries",
        type=int,
        default=5,
        show_default=True,
        help="With --server: retries per row of a transient failure (refused or reset "
        "connection, timeout, HTTP 408/429/5xx).",
    ),
    click.option(
        "--retry-backoff-seconds",
        type=float,
        default=1.0,
        show_default=True,
        help="With --server: the first retry's wait, doubled each time (jittered; the "
        "server's Retry-After wins).",
    ),
    click.option(
        "--request-timeout",
        type=float,
        default=600.0,
        show_default=True,
        help="With --server: seconds one request may take before it is retried.",
    ),
    click.option(
        "--server-fail-seconds",
        type=float,
        default=300.0,
        show_default=True,
        help="With --server: when no request succeeds for this long, stop, commit and exit 75.",
    ),
)

# The --server flags and the ServerConfig field each sets.
_SERVER_FIELDS = {
    "api_key_env": "api_key_env",
    "tokenizer": "tokenizer",
    "prompt_form": "prompt_form",
    "max_retries": "max_retries",
    "retry_backoff_seconds": "retry_backoff_seconds",
    "request_timeout": "request_timeout",
    "server_fail_seconds": "fail_seconds",
}


def _server_config(kw: dict[str, Any]):
    """ServerConfig from the --server flags; None without --server, where the others are refused."""
    from pipeline.config import ServerConfig

    values = {field: kw[flag] for flag, field in _SERVER_FIELDS.items()}
    if kw["server"] is None:
        defaults = ServerConfig("http://localhost/v1")
        given = [
            f for f, field in _SERVER_FIELDS.items() if values[field] != getattr(defaults, field)
        ]
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise click.UsageError(f"{flags}: only with --server URL")
        return None
    try:
        return ServerConfig(url=kw["server"], **values)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


def _sampling_option(option: SamplingOption) -> Callable:
    """The click flag of one entry of pipeline.sampling.SAMPLING_OPTIONS."""
    if option.switch:
        return click.option(option.flag, is_flag=True, default=None, help=option.help)
    if option.from_file:
        return click.option(
            option.flag, metavar="FILE", type=click.Path(dir_okay=False), help=option.help
        )
    if option.multiple:
        return click.option(
            option.flag, multiple=True, metavar=option.kind.__name__.upper(), help=option.help
        )
    shown = {"show_default": True, "default": option.neutral} if option.name == "n" else {}
    return click.option(option.flag, type=option.kind, help=option.help, **shown)


sampling_options = _options(
    *(_sampling_option(o) for o in SAMPLING_OPTIONS),
    click.option(
        "--max-tokens-column",
        metavar="COL",
        help="Integer column with each row's own max tokens (null: --max-tokens).",
    ),
    click.option(
        "--json-schema-column",
        metavar="COL",
        help="Column with each row's own JSON Schema (JSON text or struct).",
    ),
    click.option(
        "--lora-column",
        metavar="COL",
        help="Column naming each row's --lora adapter (null: the base model).",
    ),
    click.option(
        "--sampling-column",
        metavar="COL",
        help="Column of per-row settings overriding the flags (JSON text or struct), e.g. "
        '{"temperature": 0.7, "n": 2, "seed": 5}.',
    ),
    click.option(
        "--seed",
        type=int,
        default=0,
        show_default=True,
        help="Run seed; each row's seed derives from it and the row id.",
    ),
)

output_options = _options(
    click.option(
        "--output", "-o", metavar="DIR", help="Output folder of Parquet shards (required)."
    ),
    click.option(
        "--rows-per-shard",
        type=int,
        default=10_000,
        show_default=True,
        help="Rows per shard; a shard is the unit of commit.",
    ),
    click.option(
        "--checkpoint-seconds",
        type=float,
        default=300.0,
        show_default=True,
        help="Commit a partial shard after this long.",
    ),
    click.option(
        "--keep-prompt", is_flag=True, help="Write the rendered prompt as column 'prompt'."
    ),
    click.option(
        "--keep-columns",
        metavar="COLS",
        help="Comma-separated input columns to copy to the output.",
    ),
    click.option(
        "--overwrite", is_flag=True, help="Discard earlier output in --output and start afresh."
    ),
    click.option(
        "--card",
        is_flag=True,
        help="Write the dataset card OUT/README.md when the run finishes (pandas and pyarrow "
        "then read OUT/*.parquet, not OUT).",
    ),
)


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


scale_options = _options(
    click.option(
        "--data-parallel",
        type=_DataParallel(),
        help="Run the input as N ranks on this node, one process each on its own GPUs "
        "(auto: visible GPUs / --tensor-parallel-size; 1 on CPU).",
    ),
    click.option(
        "--num-shards",
        type=int,
        help="Split the input into this many ranks [default: from the launcher, else 1].",
    ),
    click.option(
        "--shard-index",
        type=int,
        help="This process's rank [default: from Slurm, torchrun, MPI or a Kubernetes "
        "Indexed Job, else 0].",
    ),
    click.option(
        "--drain-seconds",
        type=float,
        default=30.0,
        show_default=True,
        help="On SIGTERM/SIGINT/SIGUSR1, let running requests finish this long.",
    ),
    click.option(
        "--max-inflight", type=int, help="Requests kept in the engine [default: 4 x max-num-seqs]."
    ),
    click.option(
        "--engine-restarts",
        type=int,
        default=2,
        show_default=True,
        help="Engine deaths (killed, out of memory, crash) survived by restarting it.",
    ),
    click.option(
        "--stall-seconds",
        type=float,
        default=600.0,
        show_default=True,
        help="A step producing nothing this long is a stall, handled like a death.",
    ),
    click.option(
        "--max-error-rate",
        type=float,
        default=0.1,
        show_default=True,
        help="Exit 1 if more than this share of prompts became error rows (all are committed).",
    ),
    click.option(
        "--progress-seconds",
        type=float,
        help="Progress line interval [default: 0.5 s on a terminal, 30 s in logs].",
    ),
    click.option(
        "-v",
        "--verbose",
        count=True,
        help="More logging: -v shows vLLM's own log on the terminal (else it goes to "
        "OUT/.batchgen/logs/engine-rank-N.log).",
    ),
    click.option("--progress-fd", type=int, hidden=True),  # a --data-parallel rank's progress pipe
)


config_option = click.option(
    "--config",
    metavar="FILE",
    callback=_load_config_file,
    is_eager=True,
    expose_value=False,
    help="TOML job config; keys are long flag names (flags override it).",
)


@main.command(epilog=RUN_EXAMPLES)
@config_option
@input_options
@prompt_options
@engine_options
@server_options
@sampling_options
@output_options
@scale_options
def run(**kw: Any) -> None:
    """Generate completions for every row of a dataset into sharded Parquet."""
    ctx = click.get_current_context()
    verbose = kw.pop("verbose")
    kw["engine_log"] = verbose == 0
    _setup_logging(verbose)
    if not kw["output"]:
        raise click.UsageError("Missing option '--output' / '-o' (or `output` in --config).")
    data_parallel = kw.pop("data_parallel")
    if data_parallel is not None:
        node = _node_plan(kw, data_parallel)
        if node is not None:
            _run_node(ctx, kw, node)
            return
    rank = _set_rank(kw)
    cfg = _build_config(kw)
    if rank.from_launcher:
        from pipeline.launch import pin_local_gpus

        pinned = pin_local_gpus(rank, cfg.engine.tensor_parallel_size)
        if pinned:
            log.info("%s", pinned)
    from pipeline.runner import run as run_pipeline

    try:
        result = run_pipeline(cfg)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    except BatchgenError as exc:
        raise click.ClickException(str(exc)) from exc
    if result.status == "interrupted":
        sys.exit(EXIT_INTERRUPTED)


def _node_plan(kw: dict[str, Any], data_parallel: int | str):
    """The ranks and slots of `--data-parallel`; None when that is one rank in this process."""
    if kw["shard_index"] is not None:
        raise click.UsageError(
            f"--data-parallel {data_parallel} starts every rank itself; drop --shard-index "
            "(--num-shards N alone with --data-parallel runs the N ranks, that many at a time)"
        )
    try:
        found = launcher_rank(kw["num_shards"], os.environ)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if found is not None:
        raise click.UsageError(
            f"--data-parallel {data_parallel} starts its own ranks, but {found.origin} already "
            f"made this process rank {found.index} of {found.count}; drop --data-parallel "
            "and let the launcher start the ranks, or start batchgen outside the launcher"
        )
    from pipeline.launch import plan_node

    try:
        plan = plan_node(data_parallel, kw["num_shards"], kw["tensor_parallel_size"])
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if plan.num_ranks == 1 and kw["num_shards"] is None:
        return None
    return plan


def _run_node(ctx: click.Context, kw: dict[str, Any], plan: Any) -> None:
    """Start the ranks of `plan`; exit as the README's exit-code table says."""
    from pathlib import Path

    from pipeline.launch import NodeRun

    kw["num_shards"], kw["shard_index"] = plan.num_ranks, 0
    _build_config(kw)  # every flag checked once here, before any rank starts
    node = NodeRun(
        _rank_flags(ctx), plan, Path(kw["output"]), kw["overwrite"], kw["progress_seconds"]
    )
    try:
        code = node.run()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    except BatchgenError as exc:
        raise click.ClickException(str(exc)) from exc
    if code:
        sys.exit(code)


# Not handed to the ranks --data-parallel starts: each gets its own rank, the launcher does
# --overwrite for all of them at once, and --config's values are handed on as flags.
_NOT_FOR_RANKS = (
    "config",
    "data_parallel",
    "num_shards",
    "shard_index",
    "overwrite",
    "progress_fd",
)


def _rank_flags(ctx: click.Context) -> list[str]:
    """Flags that give a rank this command's settings, from the command line and --config alike."""
    flags: list[str] = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in _NOT_FOR_RANKS:
            continue
        source = ctx.get_parameter_source(param.name)
        if source in (None, click.core.ParameterSource.DEFAULT):
            continue
        value = ctx.params[param.name]
        flag = next(o for o in param.opts if o.startswith("--"))
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


def _set_rank(kw: dict[str, Any]) -> Any:
    """--shard-index and --num-shards: given together, else from a launcher (Slurm, torchrun,
    MPI, a Kubernetes Indexed Job), else rank 0 of 1. Returns where the rank came from."""
    try:
        rank = resolve_rank(kw["num_shards"], kw["shard_index"])
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    kw["shard_index"], kw["num_shards"] = rank.index, rank.count
    return rank


def _engine_config(kw: dict[str, Any], backend: str, server: Any = None):
    """EngineConfig from the engine flags shared by `run` and `bench`."""
    from pipeline.adapters import parse_lora_flags
    from pipeline.config import EngineConfig

    return EngineConfig(
        model=kw["model"],
        model_impl=kw["model_impl"],
        dtype=kw["dtype"],
        max_model_len=kw["max_model_len"],
        tensor_parallel_size=kw["tensor_parallel_size"],
        gpu_memory_utilization=kw["gpu_memory_utilization"],
        max_num_seqs=kw["max_num_seqs"],
        enforce_eager=kw["enforce_eager"],
        trust_remote_code=kw["trust_remote_code"],
        seed=kw["seed"],
        engine_args=_key_values(kw["engine_arg"]),
        backend=backend,
        server=server,
        loras=parse_lora_flags(tuple(kw["lora"])),
        reasoning_parser=kw["reasoning_parser"],
        batch_invariant=kw["batch_invariant"],
    )


def _build_config(kw: dict[str, Any]):
    from pipeline.config import OutputConfig, PromptConfig, RunConfig, SourceConfig
    from pipeline.sampling import SamplingConfig

    keep = tuple(c.strip() for c in (kw["keep_columns"] or "").split(",") if c.strip())
    try:
        return RunConfig(
            source=SourceConfig(
                parquet=kw["parquet"],
                dataset=kw["dataset"],
                data_files=tuple(kw["data_files"]),
                config_name=kw["config_name"],
                split=kw["split"],
                revision=kw["revision"],
                streaming=kw["streaming"],
                id_column=kw["id_column"],
            ),
            prompt=PromptConfig(
                prompt_column=kw["prompt_column"],
                template=kw["template"],
                messages_column=kw["messages_column"],
                chat=kw["chat"],
                system_prompt=kw["system_prompt"],
                chat_template=kw["chat_template"],
                chat_template_kwargs=_key_values(
                    kw["chat_template_kwarg"], "--chat-template-kwarg", "enable_thinking=false"
                ),
            ),
            engine=_engine_config(
                kw, kw["backend"], _server_config(kw) if "server" in kw else None
            ),
            sampling=SamplingConfig.of(
                kw["max_tokens_column"],
                kw["json_schema_column"],
                kw["sampling_column"],
                **{o.name: kw[o.name] for o in SAMPLING_OPTIONS},
            ),
            output=OutputConfig(
                path=kw["output"],
                rows_per_shard=kw["rows_per_shard"],
                checkpoint_seconds=kw["checkpoint_seconds"],
                keep_prompt=kw["keep_prompt"],
                keep_columns=keep,
                overwrite=kw["overwrite"],
                card=kw["card"],
            ),
            num_ranks=kw["num_shards"],
            rank=kw["shard_index"],
            drain_seconds=kw["drain_seconds"],
            progress_seconds=kw["progress_seconds"],
            progress_fd=kw["progress_fd"],
            max_inflight=kw["max_inflight"],
            max_error_rate=kw["max_error_rate"],
            lora_column=kw["lora_column"],
            engine_log=kw.get("engine_log", True),
            engine_restarts=kw["engine_restarts"],
            stall_seconds=kw["stall_seconds"],
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


@main.group()
def model() -> None:
    """The bundled default model (SmolLM2-135M-Instruct)."""


@model.command("prepare")
def model_prepare() -> None:
    """Convert the bundled GGUF model to safetensors once (make install runs this)."""
    _setup_logging(0)
    from pipeline.models import ensure_bundled_model

    try:
        path = ensure_bundled_model()
    except BatchgenError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(path))


BENCH_EXAMPLES = """\b
Examples:
  # this machine, the bundled model, a few hundred prompts (under 10 minutes on 2 CPU cores)
  batchgen bench
\b
  # a GPU host, a shape-only model folder with random weights
  python3 -m pipeline bench --model /root/models/llama-8b-shape --engine-arg load_format=dummy \\
      --prompts 2048 --max-tokens 512 --json
\b
  # tuned settings (from `batchgen tune`) against raw vLLM with its defaults, on a rewrite job
  batchgen bench --raw-defaults --engine-arg 'speculative_config={"method": "ngram", \
      "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}' \
      --task 'Rewrite the following text in a formal tone.' --stop-at-eos
\b
  # what the HTTP hop costs: side (b) sends its rows to `vllm serve` of the same model
  batchgen bench --server http://127.0.0.1:8000/v1 --dtype float32
\b
  # peak memory and the I/O path's rows/s with the fake engine, 250k and 1M input rows
  batchgen bench --memory
"""

# Flags of the throughput bench that mean nothing with --memory.
_THROUGHPUT_ONLY = (
    "prompts",
    "system_prompt",
    "min_tokens",
    "max_tokens",
    "min_prompt_tokens",
    "max_prompt_tokens",
    "temperature",
    "rounds",
    "budget_seconds",
    "max_inflight",
    "with_transformers",
    "transformers_prompts",
    "server",
    "json_schema",
    "choice",
    "raw_defaults",
    "task",
    "stop_at_eos",
)


@main.command(epilog=BENCH_EXAMPLES)
@engine_options
@server_options
@click.option("--prompts", type=int, default=256, show_default=True, help="Prompts per pass.")
@click.option(
    "--max-tokens",
    type=int,
    default=128,
    show_default=True,
    help="Longest output budget; each prompt's is log-uniform in [--min-tokens, this].",
)
@click.option("--min-tokens", type=int, default=8, show_default=True, help="Shortest budget.")
@click.option("--max-prompt-tokens", type=int, default=512, show_default=True)
@click.option("--min-prompt-tokens", type=int, default=16, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option(
    "--chat/--no-chat",
    default=True,
    show_default=True,
    help="Render prompts through the chat template.",
)
@click.option(
    "--system-prompt",
    metavar="TEXT",
    help="One system message for every prompt (a shared prefix, as prefix caching serves).",
)
@click.option(
    "--task",
    metavar="TEXT",
    help="Every prompt's instruction, e.g. 'Rewrite the following text in a formal tone.' "
    "[default: a mix of tasks].",
)
@click.option(
    "--stop-at-eos",
    is_flag=True,
    help="Stop outputs at end-of-sequence as a job does (budgets become caps; each side's own "
    "tokens count), e.g. to compare settings that change greedy texts.",
)
@click.option(
    "--rounds",
    type=int,
    default=5,
    show_default=True,
    help="Rounds of raw and batchgen, alternating which goes first; medians are reported.",
)
@click.option(
    "--budget-seconds",
    type=float,
    default=540.0,
    show_default=True,
    help="Start no round that would end later than this (0: no limit).",
)
@click.option(
    "--rows-per-shard",
    type=int,
    help="Commit a shard every this many rows [default: prompts/8, at most 2000; --memory: 2000].",
)
@click.option("--max-inflight", type=int, help="As for `batchgen run`.")
@click.option(
    "--raw-defaults",
    is_flag=True,
    help="Time raw vLLM on its own engine with vLLM's defaults for the settings `batchgen tune` "
    "searches; batchgen on the engine these flags describe.",
)
@click.option(
    "--with-transformers", is_flag=True, help="Also time plain Transformers generate (the floor)."
)
@click.option(
    "--transformers-prompts",
    type=int,
    default=32,
    show_default=True,
    help="Prompts for --with-transformers.",
)
@click.option(
    "--json-schema",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Both sides constrain their outputs to this JSON Schema.",
)
@click.option("--choice", multiple=True, help="Both sides answer with one of these; repeatable.")
@click.option("--logprobs", type=int, help="Both sides return the top K logprobs per token.")
@click.option("--seed", type=int, default=0, show_default=True, help="Prompt set and run seed.")
@click.option(
    "--memory", is_flag=True, help="Measure peak RSS and I/O rows/s with the fake engine instead."
)
@click.option(
    "--memory-rows",
    metavar="N,N",
    help="Input sizes for --memory [default: 250000,1000000].",
)
@click.option(
    "--work-dir", metavar="DIR", help="Keep inputs and outputs here [default: a temp dir]."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("-v", "--verbose", count=True, help="More logging (-v: vLLM's too).")
@click.pass_context
def bench(ctx: click.Context, **kw: Any) -> None:
    """Measure batchgen against raw vLLM on the same work, or its memory and I/O path.

    Times (a) one raw `LLM.generate` call over every prompt (as token ids) and (b) the full
    `batchgen run` from Parquet to Parquet shards, in alternating rounds on one engine, and
    prints output tok/s, prompt+output tok/s, the engine start and the ratio b/a.
    """
    _setup_logging(kw.pop("verbose"))
    # vLLM logs to stdout by default; --json promises stdout holds one JSON object.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    given = {
        name
        for name in kw
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    }
    if kw["memory"]:
        wrong = sorted(given & set(_THROUGHPUT_ONLY))
        if wrong:
            flags = ", ".join("--" + n.replace("_", "-") for n in wrong)
            raise click.UsageError(f"{flags}: only for the throughput bench; drop --memory")
    elif kw["memory_rows"] is not None:
        raise click.UsageError("--memory-rows needs --memory")
    if kw["backend"] == "fake" and not kw["memory"]:
        raise click.UsageError(
            "--engine fake: the throughput bench compares batchgen with vLLM; use --memory for "
            "the fake engine"
        )
    from pipeline import bench as benchmod

    emit = benchmod.reserve_stdout() if kw["as_json"] else click.echo
    try:
        if kw["memory"]:
            sizes = _memory_sizes(kw["memory_rows"])
            report = benchmod.run_memory(
                sizes,
                model=kw["model"],
                chat=kw["chat"],
                rows_per_shard=kw["rows_per_shard"] or 2000,
                work_dir=kw["work_dir"],
                logprobs=kw["logprobs"],
            )
            text = benchmod.format_memory(report)
        else:
            engine = _engine_config(kw, "vllm")
            if kw["raw_defaults"]:
                from pipeline.tune import baseline_engine

                raw_engine = baseline_engine(engine)
            else:
                raw_engine = None
            cfg = benchmod.BenchConfig(
                engine=engine,
                raw_engine=raw_engine,
                prompts=kw["prompts"],
                min_tokens=kw["min_tokens"],
                max_tokens=kw["max_tokens"],
                min_prompt_tokens=kw["min_prompt_tokens"],
                max_prompt_tokens=kw["max_prompt_tokens"],
                temperature=kw["temperature"],
                chat=kw["chat"],
                system_prompt=kw["system_prompt"],
                rounds=kw["rounds"],
                budget_seconds=kw["budget_seconds"],
                rows_per_shard=kw["rows_per_shard"],
                max_inflight=kw["max_inflight"],
                with_transformers=kw["with_transformers"],
                transformers_prompts=kw["transformers_prompts"],
                seed=kw["seed"],
                work_dir=kw["work_dir"],
                server=_server_config(kw),
                request=tuple(
                    (k, tuple(v) if isinstance(v, tuple | list) else v)
                    for k in ("json_schema", "choice", "logprobs")
                    if (v := kw[k]) not in (None, ())
                ),
                task=kw["task"],
                stop_at_eos=kw["stop_at_eos"],
            )
            report = benchmod.run_throughput(cfg)
            text = benchmod.format_throughput(report)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    except BatchgenError as exc:
        raise click.ClickException(str(exc)) from exc
    emit(benchmod.to_json(report) if kw["as_json"] else text)


def _memory_sizes(value: str | None) -> tuple[int, ...]:
    if value is None:
        return (250_000, 1_000_000)
    try:
        sizes = tuple(int(v.replace("_", "")) for v in value.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(
            f"{value!r}: expected row counts separated by commas, e.g. 250000,1000000",
            param_hint="--memory-rows",
        )
    return sizes


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
    "write_config",
    "as_json",
    "verbose",
)


@main.command(epilog=TUNE_EXAMPLES)
@click.option(
    "--config",
    metavar="FILE",
    callback=_load_config_file,
    is_eager=True,
    expose_value=False,
    help="The job's TOML config, as for `batchgen run` (flags override it).",
)
@input_options
@prompt_options
@engine_options
@sampling_options
@output_options
@scale_options
@click.option(
    "--sample",
    type=int,
    default=256,
    show_default=True,
    help="Rows from the start of the input timed in every trial; more than --max-num-seqs.",
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
    "--write-config",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Write the job config with the winning engine settings here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def tune(ctx: click.Context, **kw: Any) -> None:
    """Find the engine settings that run this job fastest here, on a sample of its rows.

    Takes the same input, prompt, engine and sampling flags as `batchgen run` (or its
    --config), times short trials of vLLM settings against the job's own (vLLM's defaults
    for whatever it leaves out), each on its own engine, and reports every trial's output tok/s,
    its spread and the gain; --write-config writes the winner as a job config.
    """
    job_keys = _given_options(ctx, skip=_TUNE_ONLY)
    _setup_logging(kw.pop("verbose"))
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    # Tuning reads the start of the whole input and writes no output.
    kw["shard_index"], kw["num_shards"] = 0, 1
    from pipeline import tune as tunemod
    from pipeline.bench import reserve_stdout, to_json

    try:
        cfg = tunemod.TuneConfig(
            run=_build_config(kw),
            sample=kw["sample"],
            repeats=kw["repeats"],
            budget_seconds=kw["budget_seconds"],
            min_gain=kw["min_gain"],
            tries=_key_values(kw["try_values"], "--try", "max_num_seqs=64"),
            allow_output_changes=kw["allow_output_changes"],
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    emit = reserve_stdout() if kw["as_json"] else click.echo
    try:
        report = tunemod.tune_report(cfg, tunemod.run_tune(cfg))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    except BatchgenError as exc:
        raise click.ClickException(str(exc)) from exc
    report["config_written"] = None
    if kw["write_config"]:
        from pathlib import Path

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


def _given_options(ctx: click.Context, skip: tuple[str, ...]) -> dict[str, Any]:
    """The options given on the command line or in --config (not their defaults), keyed by
    long flag name as a job config writes them; lists for repeatable flags."""
    given: dict[str, Any] = {}
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in skip or param.name == "config":
            continue
        source = ctx.get_parameter_source(param.name)
        if source in (None, click.core.ParameterSource.DEFAULT):
            continue
        value = ctx.params[param.name]
        flag = next(opt[2:] for opt in param.opts if opt.startswith("--"))
        given[flag] = list(value) if param.multiple else value
    return given


STATUS_EPILOG = """\b
Each rank is one of: finished; running (its lock is held by a live process); interrupted
(stopped by a signal); crashed (its process died, e.g. killed or out of memory); failed (an
error it records, e.g. a full disk); not started. All but finished resume by rerunning the
same `batchgen run` command.
\b
Exit codes:
  0  every rank finished
  1  OUTPUT holds no batchgen run, or its state cannot be read
  2  bad usage
  3  incomplete: a rank is running, interrupted, crashed or not started
  4  failed: a rank failed; fix its error, then rerun to resume
"""


def _output_folder(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """OUTPUT of status/show/report/card: a URL is refused in one line, never read as a path."""
    from pipeline.storage import require_output_location

    try:
        require_output_location(value, "OUTPUT")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    return value


@main.command(epilog=STATUS_EPILOG)
@click.argument("output", type=click.Path(file_okay=False), callback=_output_folder)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts.")
def status(output: str, as_json: bool) -> None:
    """Show what each rank of an --output folder has committed, and whether it is done."""
    from pathlib import Path

    from pipeline.status import read_status

    try:
        report = read_status(Path(output))
    except BatchgenError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(report.to_dict(), sort_keys=True) if as_json else report.render())
    sys.exit(report.exit_code)


PLAN_EPILOG = """\b
Examples:
  # what the sample job would do: prompts, error rows, tokens, the output-token ceiling
  batchgen plan --parquet data/prompts.parquet --prompt-column prompt --chat \\
      --max-tokens 128 --output out/sample
\b
  # every rank of a 4-rank job, with an ETA measured on this machine for 30 s
  batchgen plan --config jobs/examples/sample.toml --num-shards 4 --shard-index 0 \\
      --all-ranks --calibrate 30
\b
Takes the flags of `batchgen run` (or its --config). Without --calibrate no engine starts;
the ETA then comes from the last run recorded in --output, or none is given.
Exit codes: 0 the job can run, 1 it cannot (the reason is printed), 2 bad usage.
"""


@main.command(epilog=PLAN_EPILOG)
@config_option
@input_options
@prompt_options
@engine_options
@server_options
@sampling_options
@output_options
@scale_options
@click.option(
    "--all-ranks", is_flag=True, help="Plan every rank of --num-shards, not only this one."
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
    _setup_logging(kw.pop("verbose"))
    _set_rank(kw)
    if kw["output"] is None:
        kw["output"] = ""  # plan without an output folder: nothing committed
    cfg = _build_config(kw)
    from pipeline.plan import make_plan

    emit = click.echo
    if kw["as_json"] and kw["calibrate"]:
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        from pipeline.bench.machine import reserve_stdout

        emit = reserve_stdout()
    try:
        result = make_plan(cfg, all_ranks=kw["all_ranks"], calibrate=kw["calibrate"])
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    except BatchgenError as exc:
        raise click.ClickException(str(exc)) from exc
    emit(json.dumps(result.to_dict(), sort_keys=True) if kw["as_json"] else result.render())
    sys.exit(result.exit_code)


SHOW_EPILOG = """\b
Examples:
  batchgen show out/sample --limit 5
  batchgen show out/sample --where finish_reason=length --sample 3 --seed 1
  batchgen show out/sample --errors
  batchgen show out/sample --id sample-007 --id sample-012
\b
--where compares a column with a value (COL=VALUE, or COL!=VALUE); repeat it to require
several. Rows are printed in output order, wrapped to the terminal, through a pager on a
terminal and as plain text when piped. Only committed shards are read, so it is safe to run
while the job runs.
"""


@main.command(epilog=SHOW_EPILOG)
@click.argument("output", type=click.Path(file_okay=False), callback=_output_folder)
@click.option(
    "--where",
    multiple=True,
    metavar="COL=VALUE",
    help="Only rows whose column COL equals VALUE (COL!=VALUE: differs); repeatable.",
)
@click.option("--errors", is_flag=True, help="Only error rows.")
@click.option(
    "--id", "ids", multiple=True, metavar="ID", help="Only the row with this id; repeatable."
)
@click.option(
    "--sample", type=click.IntRange(min=1), metavar="N", help="A random N of the matching rows."
)
@click.option("--seed", type=int, help="Seed of --sample [default: 0].")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Show at most N rows.")
def show(
    output: str,
    where: tuple[str, ...],
    errors: bool,
    ids: tuple[str, ...],
    sample: int | None,
    seed: int | None,
    limit: int | None,
) -> None:
    """Print committed rows of an --output folder for a person to read."""
    import shutil
    from pathlib import Path

    from pipeline.show import render, select

    if seed is not None and sample is None:
        raise click.UsageError("--seed goes with --sample N")
    out = Path(output)
    try:
        sel = select(out, where, errors, ids, sample, seed or 0, limit)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    except BatchgenError as exc:
        raise click.ClickException(str(exc)) from exc
    text = render(sel, out, shutil.get_terminal_size((100, 24)).columns)
    if sys.stdout.isatty():
        click.echo_via_pager(text)
    else:
        click.echo(text)


@main.command()
@click.argument("output", type=click.Path(file_okay=False), callback=_output_folder)
def card(output: str) -> None:
    """Write OUTPUT/README.md, the dataset card: features, data files, how the data was made.

    A finished run writes it itself; this (re)writes it for any committed output, so that
    `datasets.load_dataset(OUTPUT)` and `hf upload-large-folder` take the folder as it is.
    """
    from pathlib import Path

    from pipeline.card import write_card

    try:
        click.echo(write_card(Path(output)))
    except BatchgenError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.argument("output", type=click.Path(file_okay=False), callback=_output_folder)
@click.option(
    "--html",
    "html",
    required=True,
    metavar="FILE",
    help="Write the report here: one self-contained HTML page.",
)
def report(output: str, html: str) -> None:
    """Write an HTML report of an --output folder: settings, progress, tokens, errors, samples.

    Built from what is committed, so it can be made while the job runs; the page needs no
    network to view (example: batchgen report out/sample --html out/sample-report.html).
    """
    from pathlib import Path

    from pipeline.htmlreport import write_report

    try:
        click.echo(write_report(Path(output), Path(html)))
    except BatchgenError as exc:
        raise click.ClickException(str(exc)) from exc
