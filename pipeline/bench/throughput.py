"""Throughput: raw vLLM vs batchgen on one engine, in alternating rounds.

One engine, started once, serves both sides in turns (with `raw_engine`, each side has its
own engine, started in turn: see `_Sides`):
  (a) raw `LLM.generate` over every prompt in one call, given the prompts as token ids (the
      engine module runs it: `VllmEngine.raw_generate`);
  (b) the full `batchgen run` (`pipeline.runner.run`) from a Parquet file of prompt text to
      Parquet shards, committing a shard (a checkpoint) every `rows_per_shard` rows; with a
      server (`--server URL`, `vllm serve` of the same model on this machine) this side sends
      its rows there, so the ratio shows what the HTTP hop costs;
  (c) optionally, a plain Transformers `generate` loop over a subset, as the floor.
Prompts mix lengths, and every row has its own output budget with `ignore_eos`, so (a) and (b)
generate exactly the same number of tokens (the bench checks it) while sequences finish at
different times, which is where draining at batch or checkpoint boundaries would show. With
`stop_at_eos` (a real job's stopping: a rewrite job, say, or settings that change greedy texts,
such as speculative decoding on one side only) and with structured output, each side's own
output tokens count.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.bench.machine import OTHER_CPU_WARN, OtherCpuMeter, bench_folder, machine_info
from pipeline.bench.workload import make_prompts, write_prompt_file
from pipeline.config import (
    EngineConfig,
    OutputConfig,
    PromptConfig,
    RunConfig,
    ServerConfig,
    SourceConfig,
)
from pipeline.errors import BatchgenError, ConfigError
from pipeline.sampling import OPTIONS_BY_NAME, SamplingConfig

log = logging.getLogger("batchgen")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What `batchgen bench` measures; the engine settings are those of `batchgen run`."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    # The raw side's own engine (`--raw-defaults`: vLLM's defaults for the settings batchgen
    # tune searches), so tuned batchgen is compared with untuned vLLM. None: one shared engine.
    raw_engine: EngineConfig | None = None
    prompts: int = 256
    # Each prompt's output budget is drawn log-uniformly from [min_tokens, max_tokens] and is
    # generated in full (ignore_eos): many short outputs, a few long ones.
    min_tokens: int = 8
    max_tokens: int = 128
    min_prompt_tokens: int = 16
    max_prompt_tokens: int = 512
    temperature: float = 0.0
    chat: bool = True
    # One system message shared by every prompt: the case prefix caching is for.
    system_prompt: str | None = None
    rounds: int = 5
    # Stop starting new rounds once another would end past this many seconds (0: no limit).
    budget_seconds: float = 540.0
    rows_per_shard: int | None = None  # None: prompts / 8, at most 2,000
    max_inflight: int | None = None
    with_transformers: bool = False
    transformers_prompts: int = 32
    seed: int = 0
    work_dir: str | None = None  # None: a temporary folder, removed at the end
    # Side (b) runs on this server (the same model, on this machine) instead of in process.
    server: ServerConfig | None = None
    # The job's own request options (pipeline.sampling names: json_schema, choice, logprobs...),
    # sent by both sides. A constrained output ends when its grammar completes, so these runs
    # do without ignore_eos and compare tok/s over what each side generated.
    request: tuple[tuple[str, Any], ...] = ()
    # Every prompt's instruction (e.g. "Rewrite the following text in a formal tone."); None:
    # the bench's mix of tasks.
    task: str | None = None
    # Stop at end-of-sequence, as a job does: budgets become caps, and each side's own output
    # tokens count (they differ where the two sides' greedy texts do).
    stop_at_eos: bool = False

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
        if self.server is not None and self.with_transformers:
            raise ConfigError("--with-transformers stops the engine; drop it with --server")
        if self.server is not None and self.engine.loras:
            raise ConfigError(
                "--lora: the server holds its own adapters; drop --lora with --server"
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


@dataclass(slots=True)
class Timing:
    """One timed pass over the whole prompt set."""

    side: str  # raw | batchgen | transformers
    seconds: float
    prompts: int
    prompt_tokens: int
    output_tokens: int
    # Share of the machine's CPU time that processes outside this bench used meanwhile: on a
    # shared machine, other work slows whichever side it overlaps.
    other_cpu: float | None = None
    # batchgen only: time in run() outside its generate loop (tokenizer load, input and resume
    # checks, final commit), all included in `seconds`.
    setup_seconds: float | None = None

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds


def run_throughput(cfg: BenchConfig) -> dict[str, Any]:
    """Start one engine, time raw vLLM and batchgen over the same prompts, return the report."""
    from pipeline.engines import get_engine
    from pipeline.models import generation_defaults, resolve_model
    from pipeline.prompts import PromptBuilder, load_tokenizer

    bench_start = time.monotonic()
    model = resolve_model(cfg.engine.model)
    with bench_folder(cfg.work_dir) as work:
        texts, budgets = make_prompts(
            cfg.prompts,
            cfg.min_prompt_tokens,
            cfg.max_prompt_tokens,
            cfg.min_tokens,
            cfg.max_tokens,
            cfg.seed,
            cfg.task,
        )
        adapters = cfg.adapters(len(texts))
        src = write_prompt_file(work / "prompts.parquet", texts, budgets, adapters)
        run_cfg = _run_config(cfg, src, work / "out", cfg.shard_rows)
        sampling = run_cfg.sampling.resolve(generation_defaults(model))

        log.info("bench: starting the engine (%s)...", model)
        engine = get_engine(cfg.engine, model)
        if not hasattr(engine, "raw_generate"):
            raise BatchgenError("the throughput bench needs the vllm engine")
        engine_start = engine.start_seconds
        server = _open_server(cfg, model)
        limit = engine.max_model_len
        if cfg.max_prompt_tokens + cfg.max_tokens > limit:
            raise ConfigError(
                f"--max-prompt-tokens {cfg.max_prompt_tokens} + --max-tokens {cfg.max_tokens} "
                f"exceed the model's context of {limit} tokens; lower one of them or raise "
                "--max-model-len"
            )

        # The raw side gets the very token ids batchgen will send: same tokenizer, same template,
        # and the row ids batchgen gives these rows (`file:row`), so with --temperature above 0
        # the per-row seeds match too.
        builder = PromptBuilder(
            run_cfg.prompt,
            load_tokenizer(model),
            (),
            "max_tokens",
            sampling,
            cfg.engine.seed,
            adapters=tuple(n for n, _ in cfg.engine.loras),
            lora_column=run_cfg.lora_column,
        )
        builder.max_model_len = limit
        columns = {"prompt": texts, "max_tokens": budgets}
        if adapters is not None:
            columns["adapter"] = adapters
        rows = builder.build(
            [f"{src.name}:{i}" for i in range(len(texts))], columns, range(len(texts))
        )
        bad = [r for r in rows if r.error is not None]
        if bad:
            raise BatchgenError(f"bench prompt {bad[0].id} was refused: {bad[0].error}")
        token_ids = [r.token_ids for r in rows]
        prompt_lens = [len(t) for t in token_ids]

        _warm_up(engine, cfg, work, rows)
        sides = _Sides(cfg, model, engine, rows)

        timings: list[tuple[Timing, Timing]] = []
        shards: int | None = None
        for i in range(cfg.rounds):
            # Alternate which side goes first (ABBA), so drift in the machine's speed over the
            # bench does not favour one side. With two engines the first round starts on
            # batchgen's (warm) one, and the one switch of each round falls inside it.
            run_cfg = _run_config(cfg, src, work / f"out-{i}", cfg.shard_rows)
            raw_first = (i % 2 == 0) == (cfg.raw_engine is None)
            if raw_first:
                raw = _time_raw(sides.engine("raw"), rows)
                ours, shards = _time_batchgen(sides.engine("batchgen"), run_cfg, model, server)
            else:
                ours, shards = _time_batchgen(sides.engine("batchgen"), run_cfg, model, server)
                raw = _time_raw(sides.engine("raw"), rows)
            if not cfg.own_lengths and raw.output_tokens != sum(budgets):
                raise BatchgenError(
                    f"raw vLLM generated {raw.output_tokens} tokens, not the {sum(budgets)} the "
                    "budgets ask for: this vLLM does not honour ignore_eos/max_tokens"
                )
            same = ours.prompt_tokens == raw.prompt_tokens and (
                cfg.own_lengths or ours.output_tokens == raw.output_tokens
            )
            if not same:
                raise BatchgenError(
                    "raw vLLM and batchgen did different work: "
                    f"{raw.prompt_tokens}+{raw.output_tokens} vs "
                    f"{ours.prompt_tokens}+{ours.output_tokens} prompt+output tokens"
                )
            timings.append((raw, ours))
            log.info(
                "bench round %d/%d (%s first): raw %.1f s (%.1f out tok/s), batchgen %.1f s "
                "(%.1f out tok/s), ratio %.3f; other processes' CPU share %s / %s",
                i + 1,
                cfg.rounds,
                "raw" if raw_first else "batchgen",
                raw.seconds,
                raw.output_tok_s,
                ours.seconds,
                ours.output_tok_s,
                ours.output_tok_s / raw.output_tok_s,
                raw.other_cpu,
                ours.other_cpu,
            )
            elapsed = time.monotonic() - bench_start
            pair = raw.seconds + ours.seconds + sides.switch_seconds()
            if (
                cfg.budget_seconds
                and i + 1 < cfg.rounds
                and elapsed + 1.1 * pair > cfg.budget_seconds
            ):
                log.info(
                    "bench: stopping after %d round(s): another would pass --budget-seconds %g",
                    i + 1,
                    cfg.budget_seconds,
                )
                break

        floor = None
        engine = sides.last["batchgen"]  # its settings are what the report describes
        if cfg.with_transformers:
            described = engine.describe()
            _shutdown(sides.current)
            floor = _time_transformers(cfg, model, token_ids, budgets, described["dtype"])

        report = _throughput_report(
            cfg, engine, engine_start, timings, prompt_lens, budgets, shards, floor
        )
        report["engine_starts_s"] = [round(s, 1) for s in sides.starts]
        report["tunables"] = sides.tunables
        if server is not None:
            report["server"] = {
                "url": server.url,
                "vllm": server.version,
                "model": server.model,
                "prefix_cache_reset": server.prefix_cache_resets > 0,
            }
            report["batchgen_input"] += f", sent to {server.url} as token ids over HTTP"
            # The server's processes are "other processes" to this bench while (b) runs.
            report["other_cpu_max"] = max(
                (r.other_cpu for r, _ in timings if r.other_cpu is not None), default=None
            )
            server.close()
        report["bench_seconds"] = round(time.monotonic() - bench_start, 1)
        return report


class _Sides:
    """The engine each side runs on. One shared engine; or, with `raw_engine`, the raw side's
    and batchgen's in turn (only one vLLM engine fits at a time, so a switch closes the other
    and starts this one). A fresh engine gets an untimed raw warm-up pass over every prompt
    first, as the shared one did: its first pass runs ~10% slow on CPU."""

    def __init__(self, cfg: BenchConfig, model: str, engine: Any, rows: list) -> None:
        self.cfg, self.model, self.rows = cfg, model, rows
        self.current = engine  # batchgen's engine, started and warmed up by the caller
        self.last = {"batchgen": engine, "raw": engine}  # each side's latest engine
        self.starts = [engine.start_seconds]
        self.warm_ups: list[float] = []
        self.tunables: dict[str, Any] = {"batchgen": engine.tunables()}
        if cfg.raw_engine is None:
            self.tunables["raw"] = self.tunables["batchgen"]

    def engine(self, side: str) -> Any:
        config = self.cfg.raw_engine if side == "raw" else self.cfg.engine
        if config is None:
            return self.current
        from pipeline.engines import get_engine

        engine = get_engine(config, self.model)
        self.last[side] = engine
        if engine is not self.current:
            self.current = engine
            self.starts.append(engine.start_seconds)
            self.tunables[side] = engine.tunables()
            log.info(
                "bench: %s engine started in %.1f s; warm-up pass...", side, engine.start_seconds
            )
            self.warm_ups.append(_time_raw(engine, self.rows).seconds)
        return engine

    def switch_seconds(self) -> float:
        """What one switch of engines costs (start and warm-up pass); 0 with one engine."""
        if self.cfg.raw_engine is None or not self.warm_ups:
            return 0.0
        return statistics.fmean(self.starts[1:]) + statistics.fmean(self.warm_ups)


def _run_config(cfg: BenchConfig, src: Path, out: Path, rows_per_shard: int) -> RunConfig:
    return RunConfig(
        source=SourceConfig(parquet=str(src)),
        prompt=PromptConfig(prompt_column="prompt", chat=cfg.chat, system_prompt=cfg.system_prompt),
        engine=cfg.batchgen_engine,
        sampling=SamplingConfig.of(
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            ignore_eos=not cfg.own_lengths,
            max_tokens_column="max_tokens",
            **dict(cfg.request),
        ),
        output=OutputConfig(path=str(out), rows_per_shard=rows_per_shard, overwrite=True),
        progress_seconds=3600.0,
        max_inflight=cfg.max_inflight,
        lora_column="adapter" if cfg.engine.loras else None,
        max_error_rate=0.0,
    )


def _warm_up(engine: Any, cfg: BenchConfig, work: Path, rows: list) -> None:
    """An untimed pass through both paths, so neither timed side pays first-call costs.

    The raw pass covers the whole prompt set: a short one left the first timed pass ~10% slower
    on CPU (kernels for new batch shapes, first touch of the KV cache), which would favour
    whichever side goes second.
    """
    texts, budgets = make_prompts(16, 8, 32, 1, 8, seed=cfg.seed + 1)
    src = write_prompt_file(work / "warmup.parquet", texts, budgets, cfg.adapters(len(texts)))
    from pipeline.runner import run

    run(_run_config(cfg, src, work / "warmup-out", 4))
    shutil.rmtree(work / "warmup-out", ignore_errors=True)
    log.info("bench: warm-up pass over all %d prompts (untimed)...", len(rows))
    _time_raw(engine, rows)


def _time_raw(engine: Any, rows: list) -> Timing:
    """Raw vLLM: one `LLM.generate` call over the rows, with the SamplingParams batchgen sends."""
    # Both sides run the same prompts: without this, whichever runs second would find their
    # prefixes cached from the first and skip most of its prefill.
    engine.reset_prefix_cache()
    meter = OtherCpuMeter()
    started = time.monotonic()
    prompts, output_tokens = engine.raw_generate(rows)
    seconds = time.monotonic() - started
    prompt_tokens = sum(len(r.token_ids) for r in rows)
    return Timing("raw", seconds, prompts, prompt_tokens, output_tokens, meter.share())


def _open_server(cfg: BenchConfig, model: str) -> Any:
    """The server of side (b), checked to serve the raw side's model; None without --server."""
    if cfg.server is None:
        return None
    from pipeline.engines import get_engine

    server = get_engine(cfg.batchgen_engine, None)
    if server.model_dir != model:
        server.close()
        raise BatchgenError(
            f"--server {server.url} serves {server.model}, not the raw side's {model}: start it "
            f"on the same model (vllm serve {model} --model-impl transformers ...), or pass "
            "that model's folder as --model"
        )
    if not server.reset_prefix_cache():
        log.warning(
            "bench: the server cannot reset its prefix cache (start it with "
            "VLLM_SERVER_DEV_MODE=1, or with --no-enable-prefix-caching): from the second "
            "round on it may find the prompts cached, which favours side (b)"
        )
    return server


def _time_batchgen(
    engine: Any, run_cfg: RunConfig, model: str, server: Any = None
) -> tuple[Timing, int]:
    import pyarrow.parquet as pq

    from pipeline.engines import get_engine
    from pipeline.runner import run

    engine.reset_prefix_cache()
    if server is not None:
        server.reset_prefix_cache()
    meter = OtherCpuMeter()
    started = time.monotonic()
    result = run(run_cfg)
    seconds = time.monotonic() - started
    other_cpu = meter.share()
    if server is None and get_engine(run_cfg.engine, model) is not engine:
        raise BatchgenError("batchgen started a second engine; the comparison would be unfair")
    if result.status != "finished":
        raise BatchgenError(f"the batchgen run ended {result.status}")
    table = pq.read_table(
        run_cfg.output_dir, columns=["prompt_tokens", "completion_tokens", "error"]
    )
    errors = table.num_rows - table.column("error").null_count
    if errors:
        raise BatchgenError(f"the batchgen run wrote {errors} error rows")
    timing = Timing(
        "batchgen",
        seconds,
        table.num_rows,
        sum(table.column("prompt_tokens").to_pylist()),
        sum(table.column("completion_tokens").to_pylist()),
        other_cpu,
        seconds - result.report["this_run"]["generate_seconds"],
    )
    shards = result.report["committed"]["shards"]
    shutil.rmtree(run_cfg.output_dir, ignore_errors=True)
    return timing, shards


def _shutdown(engine: Any) -> None:
    """Stop vLLM's engine processes so the Transformers floor has the accelerator to itself."""
    import gc

    engine.close()
    gc.collect()


def _time_transformers(
    cfg: BenchConfig, model: str, token_ids: list, budgets: list[int], dtype: str
) -> Timing:
    """Plain Transformers `generate` over the first prompts, batched with left padding."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype)
    has_weights = any(Path(model).glob("*.safetensors")) or any(Path(model).glob("*.bin"))
    if has_weights or not Path(model).is_dir():
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
    else:  # a shape-only folder (load_format=dummy): random weights of the same shape
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model), dtype=torch_dtype)
    hf = hf.to(device).eval()
    pad = hf.config.pad_token_id or hf.config.eos_token_id or 0
    if isinstance(pad, list):
        pad = pad[0]
    n = min(cfg.transformers_prompts, len(token_ids))
    batch = 8
    log.info("bench: Transformers generate over %d prompts (batches of %d)...", n, batch)
    started = time.monotonic()
    for lo in range(0, n, batch):
        ids, want = token_ids[lo : lo + batch], budgets[lo : lo + batch]
        width = max(len(t) for t in ids)
        input_ids = torch.tensor([[pad] * (width - len(t)) + t for t in ids], device=device)
        mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in ids], device=device)
        # One length per batch: the longest budget, every row running to it (like ignore_eos).
        with torch.no_grad():
            hf.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max(want),
                min_new_tokens=max(want),
                do_sample=False,
                pad_token_id=pad,
            )
    seconds = time.monotonic() - started
    # Only the tokens each row asked for count: padding a batch to its longest budget is waste.
    return Timing("transformers", seconds, n, sum(len(t) for t in token_ids[:n]), sum(budgets[:n]))


def _throughput_report(
    cfg: BenchConfig,
    engine: Any,
    engine_start: float,
    timings: list[tuple[Timing, Timing]],
    prompt_lens: list[int],
    budgets: list[int],
    shards: int | None,
    floor: Timing | None,
) -> dict[str, Any]:
    raw_out = statistics.median(r.output_tok_s for r, _ in timings)
    ours_out = statistics.median(b.output_tok_s for _, b in timings)
    described = engine.describe()
    paired = statistics.median(b.output_tok_s / r.output_tok_s for r, b in timings)
    report: dict[str, Any] = {
        # The median of the per-round ratios. Each round's two passes ran back to back, so a
        # machine whose speed drifts over the bench moves this much less than the ratio of the
        # two sides' medians (on the CPU here: 0.990 vs 1.020 in one run).
        "ratio": round(paired, 4),
        "ratio_of_medians": round(ours_out / raw_out, 4),
        "raw_output_tok_s": round(raw_out, 1),
        "batchgen_output_tok_s": round(ours_out, 1),
        "raw_total_tok_s": round(statistics.median(r.total_tok_s for r, _ in timings), 1),
        "batchgen_total_tok_s": round(statistics.median(b.total_tok_s for _, b in timings), 1),
        "ratio_per_round": [round(b.output_tok_s / r.output_tok_s, 4) for r, b in timings],
        "engine_start_s": round(engine_start, 1),
        "batchgen_outside_generate_s": round(
            statistics.median(b.setup_seconds or 0.0 for _, b in timings), 2
        ),
        "other_cpu_max": max(
            (t.other_cpu for pair in timings for t in pair if t.other_cpu is not None),
            default=None,
        ),
        "rounds": [
            {
                "raw_s": round(r.seconds, 2),
                "batchgen_s": round(b.seconds, 2),
                "raw_output_tok_s": round(r.output_tok_s, 1),
                "raw_output_tokens": r.output_tokens,
                "batchgen_output_tokens": b.output_tokens,
                "batchgen_output_tok_s": round(b.output_tok_s, 1),
                "raw_other_cpu": r.other_cpu,
                "batchgen_other_cpu": b.other_cpu,
            }
            for r, b in timings
        ],
        "prompts": len(prompt_lens),
        "prompt_tokens": sum(prompt_lens),
        "output_tokens": sum(budgets) if not cfg.own_lengths else timings[-1][0].output_tokens,
        "prompt_tokens_min_mean_max": [
            min(prompt_lens),
            round(statistics.fmean(prompt_lens), 1),
            max(prompt_lens),
        ],
        "output_tokens_min_mean_max": [
            min(budgets),
            round(statistics.fmean(budgets), 1),
            max(budgets),
        ],
        "raw_input": "token ids (TokensPrompt dicts), tokenized before timing",
        "batchgen_input": "prompt text in Parquet, read and tokenized inside the timed run",
        "same_work": _same_work(cfg),
        "stop_at_eos": cfg.own_lengths,
        "task": cfg.task,
        "request": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.request},
        "loras": [name for name, _ in cfg.engine.loras],
        "chat_template": cfg.chat,
        "system_prompt_chars": len(cfg.system_prompt or ""),
        "prefix_caching": described.get("enable_prefix_caching"),
        "temperature": cfg.temperature,
        "rows_per_shard": cfg.shard_rows,
        "shards_per_run": shards,
        "max_inflight": cfg.max_inflight,
        "model": described["model"],
        "model_impl": described["model_impl"],
        "dtype": described["dtype"],
        "max_model_len": described["max_model_len"],
        "enforce_eager": described.get("enforce_eager"),
        "max_num_seqs": getattr(engine, "max_num_seqs", None),
        "engine_args": {k: v for k, v in cfg.engine.engine_args},
        # --raw-defaults: the raw side ran on its own engine with these settings.
        "raw_defaults": cfg.raw_engine is not None,
        "raw_max_num_seqs": None if cfg.raw_engine is None else cfg.raw_engine.max_num_seqs,
        "raw_engine_args": None
        if cfg.raw_engine is None
        else {k: v for k, v in cfg.raw_engine.engine_args},
        "machine": machine_info(),
        "transformers_floor": None,
    }
    if floor is not None:
        report["transformers_floor"] = {
            "prompts": floor.prompts,
            "seconds": round(floor.seconds, 2),
            "output_tok_s": round(floor.output_tok_s, 1),
            "total_tok_s": round(floor.total_tok_s, 1),
        }
    return report


def _same_work(cfg: BenchConfig) -> str:
    if cfg.constrained:
        return (
            "identical token ids, SamplingParams (structured output, per-row max_tokens) and "
            "engine; constrained outputs end with their grammar, so each side's own tokens count"
        )
    engines = "engine" if cfg.raw_engine is None else "model (each side on its own engine)"
    if cfg.stop_at_eos:
        return (
            f"identical token ids, SamplingParams (per-row max_tokens, stopping at EOS) and "
            f"{engines}; outputs end where the model ends them, so each side's own tokens count"
        )
    return (
        f"identical token ids, SamplingParams (per-row max_tokens, ignore_eos) and {engines}; "
        "output token counts checked equal"
    )


def format_throughput(report: dict[str, Any]) -> str:
    """The throughput report as the lines `batchgen bench` prints."""
    m = report["machine"]
    where = m["gpu"] or f"{m['cpu']} ({m['cpus_usable']} usable cores)"
    p, o = report["prompt_tokens_min_mean_max"], report["output_tokens_min_mean_max"]
    if report.get("stop_at_eos"):
        outputs = (
            f"{report['output_tokens']:,} output tokens in the last raw pass (budgets "
            f"min/mean/max {o[0]}/{o[1]}/{o[2]}, stopping at EOS)"
        )
    else:
        outputs = (
            f"{report['output_tokens']:,} output tokens (min/mean/max {o[0]}/{o[1]}/{o[2]}, "
            "ignore_eos)"
        )
    task = f", every prompt: {report['task']!r}" if report.get("task") else ""
    lines = [
        f"machine: {where}; vllm {m['vllm']}, torch {m['torch']}, transformers {m['transformers']}",
        f"model: {report['model']} ({report['model_impl']}, {report['dtype']}, max_num_seqs "
        f"{report['max_num_seqs']}); engine args {report['engine_args'] or 'none'}",
        f"work: {report['prompts']} prompts, {report['prompt_tokens']:,} prompt tokens "
        f"(min/mean/max {p[0]}/{p[1]}/{p[2]}), {outputs}, temperature "
        f"{report['temperature']}{task}",
        f"raw vLLM: LLM.generate, one call, {report['raw_input']}"
        + (
            f"; on its own engine: vLLM's defaults for the tuned settings (engine args "
            f"{report['raw_engine_args'] or 'none'})"
            if report.get("raw_defaults")
            else ""
        ),
        f"batchgen: runner.run, {report['batchgen_input']}, a shard every "
        f"{report['rows_per_shard']} rows ({report['shards_per_run']} per run)",
        (
            f"engine starts (raw and batchgen in turn, in no figure): {report['engine_starts_s']} s; "
            if report.get("raw_defaults")
            else f"engine start (once, shared, not in any figure): {report['engine_start_s']} s; "
        )
        + f"batchgen's time outside its generate loop (in its figure): "
        f"{report['batchgen_outside_generate_s']} s",
        "",
        f"{'':24}{'output tok/s':>14}{'prompt+output tok/s':>22}",
        f"{'(a) raw LLM.generate':24}{report['raw_output_tok_s']:>14,.1f}"
        f"{report['raw_total_tok_s']:>22,.1f}",
        f"{'(b) batchgen run' + (' --server' if report.get('server') else ''):24}"
        f"{report['batchgen_output_tok_s']:>14,.1f}"
        f"{report['batchgen_total_tok_s']:>22,.1f}",
    ]
    server = report.get("server")
    if server:
        reset = "yes" if server["prefix_cache_reset"] else "no (it may favour (b))"
        lines.insert(
            5,
            f"server: {server['url']} (vLLM {server['vllm']}), {server['model']}; its prefix "
            f"cache reset before each pass: {reset}",
        )
    floor = report.get("transformers_floor")
    if floor:
        lines.append(
            f"{'(c) Transformers':24}{floor['output_tok_s']:>14,.1f}{floor['total_tok_s']:>22,.1f}"
            f"   ({floor['prompts']} prompts)"
        )
    rounds = ", ".join(f"{r:.3f}" for r in report["ratio_per_round"])
    lines += [
        "",
        f"ratio b/a: {report['ratio']:.3f}, the median of {len(report['rounds'])} round(s) "
        f"[{rounds}]; median b / median a: {report['ratio_of_medians']:.3f}",
    ]
    other = report.get("other_cpu_max")
    if other is not None and other > OTHER_CPU_WARN:
        lines.append(
            f"warning: other processes used up to {other:.0%} of this machine's CPU during the "
            "timed passes; rerun on a quiet machine for figures to quote"
        )
    return "\n".join(lines)
