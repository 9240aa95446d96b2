"""The shared-engine throughput bench's report and its text (pipeline/bench/throughput.py
measures; the warm protocol's report is in pipeline/bench/compare.py)."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from pipeline.bench.machine import OTHER_CPU_WARN, machine_info
from pipeline.bench.stats import spread, spread_text

if TYPE_CHECKING:
    from pipeline.bench.throughput import BenchConfig, Timing


def throughput_report(
    cfg: BenchConfig,
    engine: Any,
    engine_start: float,
    timings: list[tuple[Timing, Timing]],
    prompt_lens: list[int],
    budgets: list[int],
    shards: int | None,
    floor: Timing | None,
) -> dict[str, Any]:
    """The report: the medians and spread of the rounds, the work, the engine's settings."""
    report = _figures(timings, engine_start)
    report.update(_work(cfg, timings, prompt_lens, budgets, shards))
    report.update(_settings(cfg, engine))
    report["machine"] = machine_info()
    report["transformers_floor"] = None
    if floor is not None:
        report["transformers_floor"] = {
            "prompts": floor.prompts,
            "seconds": round(floor.seconds, 2),
            "output_tok_s": round(floor.output_tok_s, 1),
            "total_tok_s": round(floor.total_tok_s, 1),
        }
    return report


def _figures(timings: list[tuple[Timing, Timing]], engine_start: float) -> dict[str, Any]:
    raw_out = statistics.median(r.output_tok_s for r, _ in timings)
    ours_out = statistics.median(b.output_tok_s for _, b in timings)
    ratios = [b.output_tok_s / r.output_tok_s for r, b in timings]
    return {
        # The median of the per-round ratios. Each round's two passes ran back to back, so a
        # machine whose speed drifts over the bench moves this much less than the ratio of the
        # two sides' medians (on the CPU here: 0.990 vs 1.020 in one run).
        "ratio": round(statistics.median(ratios), 4),
        "ratio_spread": spread(ratios),
        "ratio_of_medians": round(ours_out / raw_out, 4),
        "raw_output_tok_s": round(raw_out, 1),
        "batchgen_output_tok_s": round(ours_out, 1),
        "raw_total_tok_s": round(statistics.median(r.total_tok_s for r, _ in timings), 1),
        "batchgen_total_tok_s": round(statistics.median(b.total_tok_s for _, b in timings), 1),
        "ratio_per_round": [round(x, 4) for x in ratios],
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
                "raw_prompt_tokens_cached": r.cached_tokens,
                "batchgen_prompt_tokens_cached": b.cached_tokens,
            }
            for r, b in timings
        ],
    }


def _work(
    cfg: BenchConfig,
    timings: list[tuple[Timing, Timing]],
    prompt_lens: list[int],
    budgets: list[int],
    shards: int | None,
) -> dict[str, Any]:
    return {
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
        "rows_per_shard": cfg.shard_rows,
        "shards_per_run": shards,
    }


def _settings(cfg: BenchConfig, engine: Any) -> dict[str, Any]:
    described = engine.describe()
    return {
        "chat_template": cfg.chat,
        "system_prompt_chars": len(cfg.system_prompt or ""),
        "prefix_caching": described.get("enable_prefix_caching"),
        "temperature": cfg.temperature,
        "max_inflight": cfg.max_inflight,
        "questions_per_document": cfg.questions_per_document,
        "group_prefixes": cfg.group_prefixes,
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
    }


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
    lines = _header_lines(report)
    lines += [
        "",
        f"{'':24}{'output tok/s':>14}{'prompt+output tok/s':>22}",
        f"{'(a) raw LLM.generate':24}{report['raw_output_tok_s']:>14,.1f}"
        f"{report['raw_total_tok_s']:>22,.1f}",
        f"{'(b) batchgen run' + (' --server' if report.get('server') else ''):24}"
        f"{report['batchgen_output_tok_s']:>14,.1f}"
        f"{report['batchgen_total_tok_s']:>22,.1f}",
    ]
    floor = report.get("transformers_floor")
    if floor:
        lines.append(
            f"{'(c) Transformers':24}{floor['output_tok_s']:>14,.1f}{floor['total_tok_s']:>22,.1f}"
            f"   ({floor['prompts']} prompts)"
        )
    lines += [
        "",
        f"ratio b/a: {spread_text(report['ratio_spread'])}; median b / median a: "
        f"{report['ratio_of_medians']:.3f}",
    ]
    if report.get("step_trace"):
        from pipeline.bench.steptrace import trace_lines

        lines += ["", *trace_lines(report["step_trace"])]
    other = report.get("other_cpu_max")
    if other is not None and other > OTHER_CPU_WARN:
        lines.append(
            f"warning: other processes used up to {other:.0%} of this machine's CPU during the "
            "timed passes; rerun on a quiet machine for figures to quote"
        )
    return "\n".join(lines)


def _header_lines(report: dict[str, Any]) -> list[str]:
    """Machine, model, work, and how each side ran."""
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
        f"raw vLLM: LLM.generate, one call, {report['raw_input']}",
        f"batchgen: runner.run, {report['batchgen_input']}, a shard every "
        f"{report['rows_per_shard']} rows ({report['shards_per_run']} per run)",
        f"engine start (once, shared, in no figure): {report['engine_start_s']} s; cold pass "
        f"(untimed): {report.get('cold_pass_s')} s; batchgen's time outside its generate loop "
        f"(in its figure): {report['batchgen_outside_generate_s']} s",
    ]
    server = report.get("server")
    if server:
        reset = "yes" if server["prefix_cache_reset"] else "no (it may favour (b))"
        lines.insert(
            5,
            f"server: {server['url']} (vLLM {server['vllm']}), {server['model']}; its prefix "
            f"cache reset before each pass: {reset}",
        )
    return lines
