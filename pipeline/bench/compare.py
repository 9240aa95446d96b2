"""The bench's warm protocol: raw vLLM and one or more batchgen sides (replica counts), each on
engines of its own kept warm for the whole bench (pipeline/bench/warm.py), alternating over the
rounds with the order rotated each round; the first, cold pass of each side is untimed and
reported apart; ratios to raw are per round, reported as median, min-max and a bootstrap
interval (pipeline/bench/stats.py).

Used by `batchgen bench` for `--raw-defaults` and `--replicas-per-gpu` (the sides need engines
with different settings, which one shared engine cannot give).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

from pipeline.bench.machine import bench_folder, machine_info
from pipeline.bench.stats import caution, spread, spread_text
from pipeline.bench.warm import Pass, Side, WarmSides, alternate, place_sides

log = logging.getLogger("batchgen")


def side_name(replicas: int) -> str:
    return "batchgen" if replicas == 1 else f"batchgen x{replicas}"


def bench_sides(cfg: Any, model: str) -> tuple[list[Side], dict[str, Any]]:
    """Raw vLLM and a batchgen side per replica count, each engine given its memory share;
    and that share, for the report."""
    raw = cfg.raw_engine if cfg.raw_engine is not None else cfg.engine
    sides = [Side("raw", "raw", raw)]
    sides += [Side(side_name(n), "batchgen", cfg.engine, n) for n in cfg.replicas or (1,)]
    return place_sides(sides, model)


def run_warm(cfg: Any) -> dict[str, Any]:
    """The whole warm bench: prompts, engines, the cold pass, the rounds; the report."""
    from pipeline.bench.throughput import bench_prompts, bench_run_config, traced_engine
    from pipeline.models import resolve_model
    from pipeline.slots import visible_gpus

    bench_start = time.monotonic()
    model = resolve_model(cfg.engine.model)
    with bench_folder(cfg.work_dir) as work:
        _, budgets, _, src = bench_prompts(cfg, work)
        run_cfg = bench_run_config(cfg, src, work / "out", cfg.shard_rows)
        sides, share = bench_sides(cfg, model)
        if cfg.trace_steps:
            folder = work / "trace"
            sides = [
                dataclasses.replace(s, engine=traced_engine(cfg, s.engine, folder)) for s in sides
            ]
        names = [s.name for s in sides]
        with WarmSides(sides, run_cfg, work, parallel=bool(visible_gpus(os.environ))) as warm:
            warm.start()
            log.info("bench: cold pass of each side (untimed: first batch shapes, first cache)")
            cold = {n: warm.run_pass(n, "cold") for n in names}
            rounds = alternate(warm, names, cfg.rounds, cfg.budget_seconds, bench_start)
            traces = _traced_passes(cfg, warm, names, work / "trace") if cfg.trace_steps else None
            tunables = {n: warm.tunables(n) for n in names}
            kv_tokens = {n: warm.kv_cache_tokens(n) for n in names}
            starts = dict(warm.starts)
        report = warm_report(cfg, sides, share, cold, rounds, budgets)
        report["engine_starts_s"] = starts
        report["tunables"] = tunables
        report["kv_cache_tokens"] = kv_tokens
        if traces is not None:
            report["step_trace"] = traces
        report["bench_seconds"] = round(time.monotonic() - bench_start, 1)
        return report


def _traced_passes(cfg: Any, warm: WarmSides, names: list[str], folder: Path) -> dict[str, Any]:
    """After the rounds, one more pass of each side with its engines' profilers on (untimed
    for the ratios); each engine's trace filed under `folder`/SIDE and summarized."""
    from pipeline.bench.steptrace import trace_sides

    passes = {n: functools.partial(warm.run_pass, n, "trace", trace=True) for n in names}
    return trace_sides(folder, passes, cfg.trace_skip, cfg.trace_steps)


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return round(statistics.median(got), 3) if got else None


def warm_report(
    cfg: Any,
    sides: list[Side],
    share: dict[str, Any],
    cold: dict[str, Pass],
    rounds: list[dict[str, Any]],
    budgets: list[int],
) -> dict[str, Any]:
    """The report of a warm bench: each side's figures and each batchgen side's ratio to raw."""
    per_side: dict[str, Any] = {}
    for side in sides:
        passes: list[Pass] = [r[side.name] for r in rounds]
        per_side[side.name] = {
            "kind": side.kind,
            "replicas": side.replicas,
            "engine_args": {k: v for k, v in side.engine.engine_args},
            "max_num_seqs": side.engine.max_num_seqs,
            "output_tok_s": spread([p.output_tok_s for p in passes], 1),
            "seconds_median": round(statistics.median(p.seconds for p in passes), 2),
            "output_tokens_median": statistics.median(p.output_tokens for p in passes),
            "gpu_busy_median": _median([p.gpu_busy for p in passes]),
            "front_cpu_median": _median([p.front_cpu for p in passes]),
            "core_cpu_median": _median([p.core_cpu for p in passes]),
            "cold_pass": cold[side.name].as_dict(),
        }
    ratios = {
        s.name: spread([r[s.name].output_tok_s / r["raw"].output_tok_s for r in rounds])
        for s in sides
        if s.kind == "batchgen"
    }
    first = next(s.name for s in sides if s.kind == "batchgen")
    return {
        "protocol": (
            "warm sides: every side's engines started once and kept; per round each side runs "
            "every prompt once, the order rotated each round; the cold first pass is untimed "
            "(reported as cold_pass); ratios are per round, then median, min-max and a "
            "bootstrap interval"
        ),
        "ratio": ratios[first]["median"],
        "ratios": ratios,
        "rounds_asked": cfg.rounds,
        "caution": caution(len(rounds), cfg.rounds),
        "sides": per_side,
        "memory_per_engine": share,
        "rounds": [{"order": r["order"], **{n: r[n].as_dict() for n in per_side}} for r in rounds],
        "prompts": cfg.prompts,
        "prompt_tokens": rounds[0]["raw"].prompt_tokens,
        "output_budget_min_mean_max": [
            min(budgets),
            round(statistics.fmean(budgets), 1),
            max(budgets),
        ],
        "stop_at_eos": cfg.own_lengths,
        "task": cfg.task,
        "temperature": cfg.temperature,
        "rows_per_shard": cfg.shard_rows,
        "model": cfg.engine.model,
        "raw_defaults": cfg.raw_engine is not None,
        "machine": machine_info(),
    }


def format_warm(report: dict[str, Any]) -> str:
    """The warm bench's report as the lines `batchgen bench` prints."""
    m = report["machine"]
    where = m["gpu"] or f"{m['cpu']} ({m['cpus_usable']} usable cores)"
    lines = [
        f"machine: {where}; vllm {m['vllm']}, torch {m['torch']}",
        f"work: {report['prompts']} prompts, {report['prompt_tokens']:,} prompt tokens, "
        f"output budgets {report['output_budget_min_mean_max']}"
        + (", stopping at EOS" if report["stop_at_eos"] else ", ignore_eos"),
        f"protocol: {report['protocol']}",
        f"memory per engine: {report['memory_per_engine']}",
        "",
        f"{'side':16}{'out tok/s (median, min-max)':>34}{'GPU busy':>10}{'front CPU':>11}"
        f"{'core CPU':>10}{'cold pass':>11}",
    ]
    for name, s in report["sides"].items():
        o = s["output_tok_s"]
        busy = "-" if s["gpu_busy_median"] is None else f"{s['gpu_busy_median']:.0%}"
        lines.append(
            f"{name:16}{o['median']:>14,.0f} ({o['min']:,.0f}-{o['max']:,.0f}){'':>2}"
            f"{busy:>10}{s['front_cpu_median'] or 0:>11.2f}{s['core_cpu_median'] or 0:>10.2f}"
            f"{s['cold_pass']['seconds']:>10.1f}s"
        )
    lines.append("")
    for name, r in report["ratios"].items():
        lines.append(f"{name} / raw: {spread_text(r)}")
    if report["caution"]:
        lines.append(f"caution: {report['caution']}")
    if report.get("step_trace"):
        from pipeline.bench.steptrace import trace_lines

        lines += ["", *trace_lines(report["step_trace"])]
    return "\n".join(lines)
