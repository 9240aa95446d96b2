"""The settings of `batchgen bench`, declared once (pipeline.options): each field with a flag is
one of the command's options. One dataclass per kind of bench; a new kind is one more:

  BenchConfig        the throughput bench: raw vLLM against batchgen on the same work
  MemoryBenchConfig  --memory: peak RSS and the I/O path's rows/s with the fake engine
  ReuseLookupConfig  --reuse-lookup: the --reuse lookup over a folder of committed rows
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config.engine import EngineConfig, ServerConfig
from pipeline.errors import ConfigError
from pipeline.options import option
from pipeline.sampling import OPTIONS_BY_NAME, SamplingConfig

# Engine steps of a traced pass skipped before its trace starts (--trace-after): past the first
# admissions, into the steady state of a pass of a few hundred steps or more.
TRACE_AFTER = 100


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What `batchgen bench` measures; the engine settings are those of `batchgen run`."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    # Side (b) runs on this server (the same model, on this machine) instead of in process.
    server: ServerConfig | None = None
    prompts: int = option(256, "Prompts per pass.")
    # Each prompt's output budget is drawn log-uniformly from [min_tokens, max_tokens] and is
    # generated in full (ignore_eos): many short outputs, a few long ones.
    max_tokens: int = option(
        128, "Longest output budget; each prompt's is log-uniform in [--min-tokens, this]."
    )
    min_tokens: int = option(8, "Shortest budget.")
    max_prompt_tokens: int = option(512)
    min_prompt_tokens: int = option(16)
    temperature: float = option(0.0)
    chat: bool = option(True, "Render prompts through the chat template.", negatable=True)
    # One system message shared by every prompt: the case prefix caching is for.
    system_prompt: str | None = option(
        None,
        "One system message for every prompt (a shared prefix, as prefix caching serves).",
        metavar="TEXT",
    )
    # Every prompt's instruction (e.g. "Rewrite the following text in a formal tone."); None:
    # the bench's mix of tasks.
    task: str | None = option(
        None,
        "Every prompt's instruction, e.g. 'Rewrite the following text in a formal tone.' "
        "[default: a mix of tasks].",
        metavar="TEXT",
    )
    # Prompts in groups sharing one document, shuffled apart (the workload of --group-prefixes).
    questions_per_document: int = option(
        1,
        "Every N prompts share one document and differ in their last question; the prompts "
        "are shuffled, so those sharing a document lie apart [default: 1, none share].",
        metavar="N",
    )
    group_prefixes: int = option(0, "As for `batchgen run` (batchgen's side only).", metavar="N")
    # Stop at end-of-sequence, as a job does: budgets become caps, and each side's own output
    # tokens count (they differ where the two sides' greedy texts do).
    stop_at_eos: bool = option(
        False,
        "Stop outputs at end-of-sequence as a job does (budgets become caps; each side's own "
        "tokens count), e.g. to compare settings that change greedy texts.",
    )
    rounds: int = option(
        5, "Rounds of raw and batchgen, alternating which goes first; medians are reported."
    )
    # Stop starting new rounds once another would end past this many seconds (0: no limit).
    budget_seconds: float = option(
        540.0, "Start no round that would end later than this (0: no limit)."
    )
    rows_per_shard: int | None = option(  # None: prompts / 8, at most 2,000
        None,
        "Commit a shard every this many rows [default: prompts/8, at most 2000; --memory: 2000].",
    )
    max_inflight: int | None = option(None, "As for `batchgen run`.")
    # The raw side on its own engine with vLLM's defaults for the settings batchgen tune
    # searches (`raw_engine`), so tuned batchgen is compared with untuned vLLM. Off: one
    # shared engine.
    raw_defaults: bool = option(
        False,
        "Time raw vLLM on its own engine with vLLM's defaults for the settings `batchgen tune` "
        "searches; batchgen on the engine these flags describe.",
    )
    # Replica counts of the batchgen sides (`--replicas-per-gpu 1,2`): each a side of its own,
    # its replicas sharing the GPU. Given (or with raw_defaults), every side runs on engines of
    # its own kept warm in worker processes (pipeline/bench/compare.py).
    replicas: tuple[int, ...] = option(
        (),
        "Batchgen sides of N engine replicas sharing each GPU (e.g. 1,2: two sides); every "
        "side on engines of its own, kept warm, rounds alternating.",
        flag="--replicas-per-gpu",
        metavar="N[,N...]",
        parse=lambda value, _flag: _replica_counts(value),
        flag_default=None,
    )
    # After the rounds, one more pass of each side on the shared engine with vLLM's torch
    # profiler tracing this many engine steps (pipeline/bench/steptrace.py); 0: none.
    trace_steps: int = option(
        0,
        "After the timed rounds, one untimed pass of each side with vLLM's torch profiler on, "
        "tracing this many engine steps: each step's period, the worker's host time and the "
        "GPU's busy time (0: none).",
        metavar="N",
        minimum=0,
    )
    trace_after: int | None = option(  # None: TRACE_AFTER (None, so a lone one is seen)
        None,
        f"--trace-steps: skip this many steps of each traced pass first, its ramp-up "
        f"[default: {TRACE_AFTER}].",
        metavar="N",
        minimum=0,
    )
    with_transformers: bool = option(False, "Also time plain Transformers generate (the floor).")
    transformers_prompts: int = option(32, "Prompts for --with-transformers.")
    # The job's own request options (pipeline.sampling names), sent by both sides (`request`).
    # A constrained output ends when its grammar completes, so these runs do without
    # ignore_eos and compare tok/s over what each side generated.
    json_schema: str | None = option(
        None, "Both sides constrain their outputs to this JSON Schema.", file=True
    )
    choice: tuple[str, ...] = option(
        (), "Both sides answer with one of these; repeatable.", multiple=True
    )
    logprobs: int | None = option(None, "Both sides return the top K logprobs per token.")
    seed: int = option(0, "Prompt set and run seed.")
    work_dir: str | None = option(  # None: a temporary folder, removed at the end
        None, "Keep inputs and outputs here [default: a temp dir].", metavar="DIR"
    )

    @property
    def request(self) -> tuple[tuple[str, Any], ...]:
        """The request options both sides send, as (pipeline.sampling name, value) pairs."""
        return tuple(
            (name, value)
            for name in ("json_schema", "choice", "logprobs")
            if (value := getattr(self, name)) not in (None, ())
        )

    @property
    def raw_engine(self) -> EngineConfig | None:
        """The raw side's own engine (--raw-defaults); None: the sides share one engine."""
        if not self.raw_defaults:
            return None
        from pipeline.tune.space import baseline_engine  # the tuner owns what it searches

        return baseline_engine(self.engine)

    @property
    def warm_sides(self) -> bool:
        """Whether the sides need engines of their own (pipeline/bench/compare.py)."""
        return bool(self.replicas) or self.raw_engine is not None

    @property
    def constrained(self) -> bool:
        return any(OPTIONS_BY_NAME[k].structured for k, _ in self.request)

    @property
    def own_lengths(self) -> bool:
        """Whether outputs end where the model (or a grammar) ends them, not at their budgets."""
        return self.stop_at_eos or self.constrained

    def adapters(self, count: int) -> list[str | None] | None:
        """Each prompt's adapter in a LoRA bench: the base model and each adapter in turn."""
        if not self.engine.loras:
            return None
        names = [None, *(n for n, _ in self.engine.loras)]
        return [names[i % len(names)] for i in range(count)]

    def __post_init__(self) -> None:
        if self.prompts < 1:
            raise ConfigError(f"--prompts {self.prompts}: must be at least 1")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ConfigError(
                f"--min-tokens {self.min_tokens} and --max-tokens {self.max_tokens}: need "
                "1 <= --min-tokens <= --max-tokens"
            )
        if not 1 <= self.min_prompt_tokens <= self.max_prompt_tokens:
            raise ConfigError(
                f"--min-prompt-tokens {self.min_prompt_tokens} and --max-prompt-tokens "
                f"{self.max_prompt_tokens}: need 1 <= --min-prompt-tokens <= --max-prompt-tokens"
            )
        if self.questions_per_document < 1:
            raise ConfigError(
                f"--questions-per-document {self.questions_per_document}: must be at least 1"
            )
        if self.rounds < 1:
            raise ConfigError(f"--rounds {self.rounds}: must be at least 1")
        if self.budget_seconds < 0:
            raise ConfigError("--budget-seconds must be 0 (no limit) or more")
        if self.rows_per_shard is not None and self.rows_per_shard < 1:
            raise ConfigError(f"--rows-per-shard {self.rows_per_shard}: must be at least 1")
        if self.transformers_prompts < 1:
            raise ConfigError("--transformers-prompts must be at least 1")
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature}: must be 0 (greedy) or more")
        if self.task is not None and not self.task.strip():
            raise ConfigError("--task: give the instruction every prompt starts with")
        if self.system_prompt is not None and not self.chat:
            raise ConfigError("--system-prompt needs the chat template: drop --no-chat")
        SamplingConfig.of(**dict(self.request))  # a bad schema or choice list: refused now
        self.raw_engine  # noqa: B018 (--raw-defaults without a tuned setting: refused now)
        if self.server is not None and self.with_transformers:
            raise ConfigError("--with-transformers stops the engine; drop it with --server")
        if self.server is not None and self.engine.loras:
            raise ConfigError(
                "--lora: the server holds its own adapters; drop --lora with --server"
            )
        if any(n < 1 for n in self.replicas):
            raise ConfigError("--replicas-per-gpu: each count must be at least 1, e.g. 1,2")
        if self.warm_sides and (self.server is not None or self.with_transformers):
            raise ConfigError(
                "--replicas-per-gpu and --raw-defaults run each side on engines of its own: drop "
                "--server and --with-transformers"
            )
        if self.trace_after is not None and not self.trace_steps:
            raise ConfigError("--trace-after needs --trace-steps N")
        if self.trace_steps and self.server is not None:
            raise ConfigError(
                "--trace-steps traces in-process engines; a server's own profiler is its "
                "--profiler-config: drop --server"
            )
        if self.server is not None and self.raw_engine is not None:
            raise ConfigError(
                "--raw-defaults starts a second engine for the raw side; with --server side (b) "
                "has none of its own: drop one of them"
            )

    @property
    def batchgen_engine(self) -> EngineConfig:
        """The engine settings of side (b): the in-process engine's, or the server's."""
        if self.server is None:
            return self.engine
        return EngineConfig(
            seed=self.engine.seed,
            trust_remote_code=self.engine.trust_remote_code,
            server=self.server,
        )

    @property
    def shard_rows(self) -> int:
        return self.rows_per_shard or max(1, min(2000, self.prompts // 8))

    @property
    def trace_skip(self) -> int:
        """Steps of a traced pass left out before the trace starts."""
        return TRACE_AFTER if self.trace_after is None else self.trace_after


def _counts(value: str | None, what: str, example: str) -> tuple[int, ...]:
    """Positive integers separated by commas (underscores allowed), or ValueError."""
    try:
        counts = tuple(int(v.replace("_", "")) for v in (value or "").split(",") if v.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise ValueError(f"{value!r}: expected {what} separated by commas, e.g. {example}")
    return counts


def _replica_counts(value: str | None) -> tuple[int, ...]:
    """--replicas-per-gpu 1,2: the replica count of each batchgen side; () without it."""
    if value is None:
        return ()
    counts = _counts(value, "distinct replica counts", "1,2")
    if len(set(counts)) != len(counts):
        raise ValueError(
            f"{value!r}: expected distinct replica counts separated by commas, e.g. 1,2"
        )
    return counts


@dataclass(frozen=True, slots=True)
class MemoryBenchConfig:
    """`batchgen bench --memory`: the fake engine over inputs of each size, each in a fresh
    process; it shares --model, --chat, --rows-per-shard, --logprobs and --work-dir with the
    throughput bench (MEMORY_SHARES), and refuses the throughput bench's other flags."""

    memory: bool = option(False, "Measure peak RSS and I/O rows/s with the fake engine instead.")
    # None: DEFAULT_MEMORY_ROWS (None, not the sizes, so a --memory-rows without --memory is seen)
    memory_rows: tuple[int, ...] | None = option(
        None,
        "Input sizes for --memory [default: 250000,1000000].",
        metavar="N,N",
        parse=lambda value, _flag: (
            None if value is None else _counts(value, "row counts", "250000,1000000")
        ),
    )

    def __post_init__(self) -> None:
        if self.memory_rows is not None and not self.memory:
            raise ConfigError("--memory-rows needs --memory")

    @property
    def sizes(self) -> tuple[int, ...]:
        """The input sizes measured."""
        return self.memory_rows or DEFAULT_MEMORY_ROWS


DEFAULT_MEMORY_ROWS = (250_000, 1_000_000)
# The throughput bench's settings --memory uses too; it refuses the others.
MEMORY_SHARES = ("chat", "rows_per_shard", "work_dir", "logprobs", "seed")
# --memory's shard size where --rows-per-shard is not given.
MEMORY_ROWS_PER_SHARD = 2000


@dataclass(frozen=True, slots=True)
class ReuseLookupConfig:
    """`batchgen bench --reuse-lookup ROWS` (pipeline/bench/reuse.py)."""

    reuse_lookup: int | None = option(
        None,
        "Measure the --reuse lookup over a folder of ROWS committed rows instead "
        "(pipeline/bench/reuse.py); --work-dir holds the folder.",
        metavar="ROWS",
    )

    def __post_init__(self) -> None:
        if self.reuse_lookup is not None and self.reuse_lookup < 1:
            raise ConfigError(f"--reuse-lookup {self.reuse_lookup}: must be at least 1 row")


@dataclass(frozen=True, slots=True)
class ScaleBenchConfig:
    """`batchgen bench --scale` (pipeline/bench/scale.py): a synthetic job of many ranks with the
    fake engine, through the code that commits real shards; the job's folder is left behind."""

    scale: bool = option(
        False,
        "Build a synthetic job of --ranks ranks with the fake engine and time rank start, "
        "resume, commits, status, show, report and plan over it (pipeline/bench/scale.py).",
    )
    ranks: int = option(
        1000,
        "--scale: ranks of the job (1: one rank with --id-column killed at half and resumed, "
        "against a 100k-row run).",
        minimum=1,
    )
    rows_per_rank: int = option(100, minimum=2)
    input_files: int = option(20, minimum=1)
    output: str | None = option(None, "--scale: the job's folder, left behind.", metavar="DIR")

    def __post_init__(self) -> None:
        if self.scale and not self.output:
            raise ConfigError("--scale needs --output DIR (the job is left there)")
