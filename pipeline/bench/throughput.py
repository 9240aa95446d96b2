"""Throughput: raw vLLM vs batchgen on one engine, in alternating rounds.

One engine, started once, serves both sides in turns (with `raw_engine` or `replicas`, each
side runs on engines of its own, kept warm in worker processes: pipeline/bench/compare.py):
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

import dataclasses
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.bench.machine import OtherCpuMeter, bench_folder
from pipeline.bench.throughput_report import format_throughput, throughput_report
from pipeline.bench.workload import make_prompts, write_prompt_file
from pipeline.config import EngineConfig, OutputConfig, PromptConfig, RunConfig, SourceConfig
from pipeline.config.bench import BenchConfig
from pipeline.errors import BatchgenError, ConfigError
from pipeline.sampling import SamplingConfig

log = logging.getLogger("batchgen")


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
    cached_tokens: int | None = None  # prompt tokens the prefix cache served (vLLM's count)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds


def bench_prompts(
    cfg: BenchConfig, work: Path
) -> tuple[list[str], list[int], list[str | None] | None, Path]:
    """The bench's prompt set (texts, output budgets, adapters) and its Parquet file in `work`."""
    texts, budgets = make_prompts(
        cfg.prompts,
        cfg.min_prompt_tokens,
        cfg.max_prompt_tokens,
        cfg.min_tokens,
        cfg.max_tokens,
        cfg.seed,
        cfg.task,
        cfg.questions_per_document,
    )
    adapters = cfg.adapters(len(texts))
    src = write_prompt_file(work / "prompts.parquet", texts, budgets, adapters)
    return texts, budgets, adapters, src


def run_throughput(cfg: BenchConfig) -> dict[str, Any]:
    """Time raw vLLM and batchgen over the same prompts, return the report: on one shared
    engine, or (`cfg.warm_sides`) on engines of each side's own (pipeline/bench/compare.py)."""
    if cfg.warm_sides:
        from pipeline.bench.compare import run_warm

        return run_warm(cfg)
    from pipeline.models import resolve_model

    bench_start = time.monotonic()
    model = resolve_model(cfg.engine.model)
    with bench_folder(cfg.work_dir) as work, _open_server(cfg, model) as server:
        if cfg.trace_steps:
            cfg = dataclasses.replace(cfg, engine=traced_engine(cfg, cfg.engine, work / "trace"))
        texts, budgets, adapters, src = bench_prompts(cfg, work)
        engine = _start_engine(cfg, model)
        rows = _bench_rows(cfg, model, engine, src, texts, budgets, adapters)
        cold = _warm_up(engine, cfg, work, rows)
        timings, shards = _rounds(cfg, engine, rows, src, work, model, server, bench_start)
        traces = _traced_passes(cfg, engine, rows, src, work, model) if cfg.trace_steps else None
        floor = None
        if cfg.with_transformers:
            described = engine.describe()
            _shutdown(engine)
            token_ids = [r.token_ids for r in rows]
            floor = _time_transformers(cfg, model, token_ids, budgets, described["dtype"])
        prompt_lens = [len(r.token_ids) for r in rows]
        report = throughput_report(
            cfg, engine, engine.start_seconds, timings, prompt_lens, budgets, shards, floor
        )
        report["cold_pass_s"] = round(cold, 2)
        report["tunables"] = {"batchgen": engine.tunables()}
        report["kv_cache_tokens"] = {"batchgen": engine.kv_cache_tokens()}
        if server is not None:
            _add_server(report, server, timings)
        if traces is not None:
            report["step_trace"] = traces
        report["bench_seconds"] = round(time.monotonic() - bench_start, 1)
        return report


def _start_engine(cfg: BenchConfig, model: str) -> Any:
    from pipeline.engines import in_process_engine

    log.info("bench: starting the engine (%s)...", model)
    engine = in_process_engine(cfg.engine, model)
    if not hasattr(engine, "raw_generate"):
        raise BatchgenError("the throughput bench needs the vllm engine")
    limit = engine.max_model_len
    if cfg.max_prompt_tokens + cfg.max_tokens > limit:
        raise ConfigError(
            f"--max-prompt-tokens {cfg.max_prompt_tokens} + --max-tokens {cfg.max_tokens} "
            f"exceed the model's context of {limit} tokens; lower one of them or raise "
            "--max-model-len"
        )
    return engine


def _bench_rows(
    cfg: BenchConfig,
    model: str,
    engine: Any,
    src: Path,
    texts: list[str],
    budgets: list[int],
    adapters: list[str | None] | None,
) -> list:
    """The rows as batchgen will send them: the raw side gets the very token ids (same
    tokenizer, same template), and the row ids batchgen gives these rows (`file:row`), so with
    --temperature above 0 the per-row seeds match too."""
    from pipeline.models import generation_defaults
    from pipeline.prompts import PromptBuilder, load_tokenizer

    run_cfg = bench_run_config(cfg, src, src.parent / "out", cfg.shard_rows)
    builder = PromptBuilder(
        run_cfg.prompt,
        load_tokenizer(model),
        (),
        "max_tokens",
        run_cfg.sampling.resolve(generation_defaults(model)),
        cfg.engine.seed,
        adapters=tuple(n for n, _ in cfg.engine.loras),
        lora_column=run_cfg.lora_column,
    )
    builder.max_model_len = engine.max_model_len
    columns = {"prompt": texts, "max_tokens": budgets}
    if adapters is not None:
        columns["adapter"] = adapters
    rows = builder.build([f"{src.name}:{i}" for i in range(len(texts))], columns, range(len(texts)))
    bad = [r for r in rows if r.error is not None]
    if bad:
        raise BatchgenError(f"bench prompt {bad[0].id} was refused: {bad[0].error}")
    return rows


def _rounds(
    cfg: BenchConfig,
    engine: Any,
    rows: list,
    src: Path,
    work: Path,
    model: str,
    server: Any,
    bench_start: float,
) -> tuple[list[tuple[Timing, Timing]], int | None]:
    """The timed rounds on the shared engine, alternating which side goes first (ABBA), so
    drift in the machine's speed over the bench does not favour one side."""
    budget = sum(r.max_tokens for r in rows) if not cfg.own_lengths else None
    timings: list[tuple[Timing, Timing]] = []
    shards: int | None = None
    for i in range(cfg.rounds):
        run_cfg = bench_run_config(cfg, src, work / f"out-{i}", cfg.shard_rows)
        if i % 2 == 0:
            raw = _time_raw(engine, rows)
            ours, shards = _time_batchgen(engine, run_cfg, model, server)
        else:
            ours, shards = _time_batchgen(engine, run_cfg, model, server)
            raw = _time_raw(engine, rows)
        _check_same_work(cfg, raw, ours, budget)
        timings.append((raw, ours))
        log.info(
            "bench round %d/%d (%s first): raw %.1f s (%.1f out tok/s), batchgen %.1f s "
            "(%.1f out tok/s), ratio %.3f; other processes' CPU share %s / %s",
            i + 1,
            cfg.rounds,
            "raw" if i % 2 == 0 else "batchgen",
            raw.seconds,
            raw.output_tok_s,
            ours.seconds,
            ours.output_tok_s,
            ours.output_tok_s / raw.output_tok_s,
            raw.other_cpu,
            ours.other_cpu,
        )
        elapsed = time.monotonic() - bench_start
        pair = raw.seconds + ours.seconds
        if cfg.budget_seconds and i + 1 < cfg.rounds and elapsed + 1.1 * pair > cfg.budget_seconds:
            log.info(
                "bench: stopping after %d round(s): another would pass --budget-seconds %g",
                i + 1,
                cfg.budget_seconds,
            )
            break
    return timings, shards


def traced_engine(cfg: BenchConfig, engine: EngineConfig, folder: Path) -> EngineConfig:
    """`engine` with vLLM's profiler configured to trace `cfg.trace_steps` steps after the first
    `cfg.trace_skip` of a traced pass into `folder`."""
    from pipeline.engines.vllm import profiler_engine_args

    folder.mkdir(parents=True, exist_ok=True)
    traced = profiler_engine_args(folder, cfg.trace_skip, cfg.trace_steps)
    return dataclasses.replace(engine, engine_args=(*engine.engine_args, *traced.items()))


def _traced_passes(
    cfg: BenchConfig, engine: Any, rows: list, src: Path, work: Path, model: str
) -> dict[str, Any]:
    """One more pass of each side on the shared engine with its profiler on, untimed for the
    ratio; each side's trace filed under `work`/trace/SIDE and summarized."""
    from pipeline.bench.steptrace import trace_sides

    def raw() -> None:
        with engine.profiling():
            _time_raw(engine, rows)

    def batchgen() -> None:
        run_cfg = bench_run_config(cfg, src, work / "out-trace", cfg.shard_rows)
        with engine.profiling():
            _time_batchgen(engine, run_cfg, model)

    passes = {"raw": raw, "batchgen": batchgen}
    return trace_sides(work / "trace", passes, cfg.trace_skip, cfg.trace_steps)


def _check_same_work(cfg: BenchConfig, raw: Timing, ours: Timing, budget: int | None) -> None:
    if budget is not None and raw.output_tokens != budget:
        raise BatchgenError(
            f"raw vLLM generated {raw.output_tokens} tokens, not the {budget} the "
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


def _add_server(report: dict[str, Any], server: Any, timings: list) -> None:
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


def bench_run_config(cfg: BenchConfig, src: Path, out: Path, rows_per_shard: int) -> RunConfig:
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
        group_prefixes=cfg.group_prefixes,
        lora_column="adapter" if cfg.engine.loras else None,
        max_error_rate=0.0,
    )


def _warm_up(engine: Any, cfg: BenchConfig, work: Path, rows: list) -> float:
    """An untimed pass through both paths, so neither timed side pays first-call costs.

    The raw pass covers the whole prompt set: a short one left the first timed pass ~10% slower
    on CPU (kernels for new batch shapes, first touch of the KV cache), which would favour
    whichever side goes second.
    """
    texts, budgets = make_prompts(16, 8, 32, 1, 8, seed=cfg.seed + 1)
    src = write_prompt_file(work / "warmup.parquet", texts, budgets, cfg.adapters(len(texts)))
    from pipeline.runner import run

    run(bench_run_config(cfg, src, work / "warmup-out", 4))
    shutil.rmtree(work / "warmup-out", ignore_errors=True)
    log.info("bench: cold pass over all %d prompts (untimed, reported as cold_pass_s)", len(rows))
    return _time_raw(engine, rows).seconds


def _time_raw(engine: Any, rows: list) -> Timing:
    """Raw vLLM: one `LLM.generate` call over the rows, with the SamplingParams batchgen sends."""
    # Both sides run the same prompts: without this, whichever runs second would find their
    # prefixes cached from the first and skip most of its prefill.
    engine.reset_prefix_cache()
    meter = OtherCpuMeter()
    started = time.monotonic()
    prompts, output_tokens, cached = engine.raw_generate(rows)
    seconds = time.monotonic() - started
    prompt_tokens = sum(len(r.token_ids) for r in rows)
    return Timing(
        "raw", seconds, prompts, prompt_tokens, output_tokens, meter.share(), cached_tokens=cached
    )


@contextmanager
def _open_server(cfg: BenchConfig, model: str) -> Iterator[Any]:
    """The server of side (b), checked to serve the raw side's model, for the length of a
    `with` block; None without --server."""
    if cfg.server is None:
        yield None
        return
    from pipeline.engines import open_engine

    with open_engine(cfg.batchgen_engine, None) as server:
        if server.model_dir != model:
            raise BatchgenError(
                f"--server {server.url} serves {server.model}, not the raw side's {model}: "
                f"start it on the same model (vllm serve {model} --model-impl transformers "
                "...), or pass that model's folder as --model"
            )
        if not server.reset_prefix_cache():
            log.warning(
                "bench: the server cannot reset its prefix cache (start it with "
                "VLLM_SERVER_DEV_MODE=1, or with --no-enable-prefix-caching): from the second "
                "round on it may find the prompts cached, which favours side (b)"
            )
        yield server


def _time_batchgen(
    engine: Any, run_cfg: RunConfig, model: str, server: Any = None
) -> tuple[Timing, int]:
    import pyarrow.parquet as pq

    from pipeline.engines import in_process_engine
    from pipeline.runner import run

    engine.reset_prefix_cache()
    if server is not None:
        server.reset_prefix_cache()
    meter = OtherCpuMeter()
    started = time.monotonic()
    result = run(run_cfg)
    seconds = time.monotonic() - started
    other_cpu = meter.share()
    if server is None and in_process_engine(run_cfg.engine, model) is not engine:
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
        result.report["this_run"]["prompt_tokens_cached"],
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


def format_report(report: dict[str, Any]) -> str:
    """The lines `batchgen bench` prints for either protocol's report."""
    if "sides" in report:
        from pipeline.bench.compare import format_warm

        return format_warm(report)
    return format_throughput(report)
