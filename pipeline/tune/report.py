"""What `batchgen tune` reports (a JSON-ready dict and its text form) and the job config it
writes: the job's own keys plus the winning engine settings, which `batchgen run --config`
takes as it is."""

from __future__ import annotations

import datetime
import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.bench.machine import OTHER_CPU_WARN, machine_info
from pipeline.tune.search import BUDGET, Trial, settings_label, settings_text
from pipeline.tune.space import FIELD_FLAGS, KNOBS, RUN_FLAGS
from pipeline.tune.tuner import TuneConfig, Tuned
from pipeline.tune.verify import format_verify


def tune_report(cfg: TuneConfig, tuned: Tuned) -> dict[str, Any]:
    """Every trial with its output tok/s, spread and gain over the baseline; the winner; what
    was not tried and why; whether the winner's texts equal the baseline's."""
    result = tuned.result
    baseline, winner = result.baseline, result.winner
    assert baseline.median is not None and winner.median is not None
    prompt_lens = [len(r.token_ids or ()) for r in tuned.sample]
    greedy = all(r.seed is None for r in tuned.sample)
    other = [t.measurement.other_cpu for t in result.trials if t.measurement.other_cpu is not None]
    return {
        "gain": round(result.gain, 4),
        "winner": {
            "trial": winner.number,
            "settings": winner.settings,
            "engine_args": [f"{k}={json.dumps(v)}" for k, v in winner.settings.items()],
            "output_tok_s": round(winner.median, 1),
            "outputs_equal": winner.rows_differ == 0 if winner.rows_differ is not None else None,
            "rows_differ": winner.rows_differ,
            "changes_outputs": [
                k.key for k in KNOBS if k.changes_outputs and k.key in winner.settings
            ],
        },
        "baseline": {
            "output_tok_s": round(baseline.median, 1),
            "effective": baseline.measurement.tunables,
            "unstable_rows": baseline.measurement.unstable_rows,
        },
        "trials": [_trial_json(t, baseline, winner) for t in result.trials],
        "not_tried": [
            {"setting": key, "value": value, "why": why} for key, value, why in result.not_tried
        ],
        "budget_seconds": cfg.budget_seconds,
        "budget_stopped": result.budget_stopped,
        "tune_seconds": round(tuned.seconds, 1),
        "repeats": cfg.repeats,
        "min_gain": cfg.min_gain,
        "allow_output_changes": cfg.allow_output_changes,
        "sample": {
            "rows": len(tuned.sample),
            "refused_rows": tuned.refused,
            "prompt_tokens": sum(prompt_lens),
            "prompt_tokens_min_mean_max": [
                min(prompt_lens),
                round(statistics.fmean(prompt_lens), 1),
                max(prompt_lens),
            ],
            "output_tokens_per_pass": baseline.measurement.output_tokens,
            "greedy": greedy,
        },
        "texts_compared": "exactly, greedy" if greedy else "with the same per-row seeds",
        "other_cpu_max": max(other, default=None),
        "model": tuned.described.get("model"),
        "model_impl": tuned.described.get("model_impl"),
        "dtype": tuned.described.get("dtype"),
        "max_model_len": tuned.described.get("max_model_len"),
        "machine": machine_info(),
    }


def _trial_json(trial: Trial, baseline: Trial, winner: Trial) -> dict[str, Any]:
    m = trial.measurement
    assert baseline.median is not None
    return {
        "trial": trial.number,
        "setting": trial.knob,
        "settings": trial.settings,
        "output_tok_s": [round(v, 1) for v in m.tok_s],
        "median_output_tok_s": None if trial.median is None else round(trial.median, 1),
        "spread": None if trial.spread is None else round(trial.spread, 4),
        "gain": None if trial.median is None else round(trial.median / baseline.median, 4),
        "engine_start_s": None if m.start_seconds is None else round(m.start_seconds, 1),
        "seconds": round(trial.seconds, 1),
        "rows_differ": trial.rows_differ,
        "first_differing_row": trial.first_differing,
        "unstable_rows": m.unstable_rows,
        "other_cpu": m.other_cpu,
        "error": m.error,
        "verdict": trial.verdict,
        "chosen": trial is winner,
    }


def format_tune(report: dict[str, Any]) -> str:
    """The report as the lines `batchgen tune` prints."""
    m = report["machine"]
    where = m["gpu"] or f"{m['cpu']} ({m['cpus_usable']} usable cores)"
    s = report["sample"]
    p = s["prompt_tokens_min_mean_max"]
    lines = [
        f"machine: {where}; vllm {m['vllm']}, torch {m['torch']}",
        f"model: {report['model']} ({report['model_impl']}, {report['dtype']}, max_model_len "
        f"{report['max_model_len']})",
        f"sample: the first {s['rows']} sendable rows of the job ({s['refused_rows']} refused), "
        f"{s['prompt_tokens']:,} prompt tokens (min/mean/max {p[0]}/{p[1]}/{p[2]}), "
        f"{s['output_tokens_per_pass'] or 0:,} output tokens a pass; {report['repeats']} timed "
        "pass(es) per trial after an untimed warm-up; engine starts are in no tok/s figure",
        "",
        f"{'trial':>5}  {'settings':<34}{'out tok/s':>10}{'spread':>8}{'gain':>7}{'start s':>9}"
        "  verdict",
    ]
    lines += [_trial_line(t) for t in report["trials"]]
    lines += _not_tried_lines(report)
    w, b = report["winner"], report["baseline"]
    lines.append("")
    if w["trial"] == 0:
        lines.append(
            f"winner: the baseline ({b['output_tok_s']:,.1f} out tok/s): no setting beat it by "
            f"--min-gain {report['min_gain']:.0%} and beyond the passes' spread; gain 1.000"
        )
    else:
        lines.append(
            f"winner: trial {w['trial']} ({settings_label(w['settings'])}): "
            f"gain {report['gain']:.3f} ({w['output_tok_s']:,.1f} vs {b['output_tok_s']:,.1f} "
            "out tok/s, medians, measured in this run)"
        )
    lines.append(_outputs_line(report))
    if report["budget_stopped"]:
        lines += _budget_lines(report)
    other = report.get("other_cpu_max")
    if other is not None and other > OTHER_CPU_WARN:
        lines.append(
            f"warning: other processes used up to {other:.0%} of this machine's CPU during the "
            "trials; on a quiet machine the spreads are smaller and small gains show"
        )
    if report.get("verify"):
        lines += format_verify(report["verify"])
    if report.get("verify_stopped"):
        done = (report.get("verify") or {}).get("rounds", 0)
        lines.append(
            f"verify: stopped by {report['verify_stopped']} after {done} round(s), before "
            "its rounds ended; the search's result above stands"
            + (" (rerun the tune with --verify to check it)" if not done else "")
        )
    written = report.get("config_written")
    if written:
        lines.append(f"config: {written} (run it with: batchgen run --config {written})")
    return "\n".join(lines)


def _trial_line(t: dict[str, Any]) -> str:
    """One trial's row of the table: settings, median out tok/s, spread, gain, engine start."""
    what = settings_label(t["settings"]) or "baseline"
    tok = "-" if t["median_output_tok_s"] is None else f"{t['median_output_tok_s']:,.1f}"
    spread = "-" if t["spread"] is None else f"{t['spread']:.1%}"
    gain = "-" if t["gain"] is None else f"{t['gain']:.3f}"
    start = "-" if t["engine_start_s"] is None else f"{t['engine_start_s']:.1f}"
    mark = "*" if t["chosen"] else " "
    return (
        f"{t['trial']:>4}{mark}  {what:<34}{tok:>10}{spread:>8}{gain:>7}{start:>9}  {t['verdict']}"
    )


def _budget_lines(report: dict[str, Any]) -> list[str]:
    """Where the budget stopped the search: what it cost, and the budget that fits the rest
    (each untried setting at the longest trial's length, a bound: a trial can stop early)."""
    lines = [
        f"stopped by --budget-seconds {report['budget_seconds']:g} after "
        f"{report['tune_seconds']:.0f} s; the settings listed as not tried were not measured"
    ]
    untried = sum(item["why"] == BUDGET for item in report["not_tried"])
    longest = max(report["trials"], key=lambda t: t["seconds"])
    need = report["tune_seconds"] + untried * longest["seconds"]
    start = longest.get("engine_start_s")
    lines.append(
        f"  each trial took up to {longest['seconds']:.0f} s here"
        + (f" (its engine start {start:.0f} s)" if start is not None else "")
        + f": --budget-seconds {math.ceil(need / 60) * 60:,} would fit the {untried} not tried"
    )
    if report["machine"]["gpu"] and longest["trial"] == 0:
        lines.append(
            "  an engine's first start on a host compiles the model; later starts reuse vLLM's "
            "compile cache (~30-90 s), so a second tune here fits more in the same budget"
        )
    return lines


def _not_tried_lines(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if report["not_tried"]:
        lines.append("")
        lines.append("not tried:")
        for item in report["not_tried"]:
            name = item["setting"]
            if item["value"] is not None:
                name = settings_label({name: item["value"]})
            lines.append(f"  {name}: {item['why']}")
    return lines


def _outputs_line(report: dict[str, Any]) -> str:
    w, s = report["winner"], report["sample"]
    dtype = report["dtype"]
    how = "greedy" if s["greedy"] else "sampled, same per-row seeds"
    if w["rows_differ"] is None:
        text = "outputs: not compared"
    elif w["rows_differ"] == 0:
        text = f"outputs: the winner's texts equal the baseline's on all {s['rows']} sample rows"
    else:
        text = (
            f"outputs: the winner's texts DIFFER from the baseline's in {w['rows_differ']} of "
            f"{s['rows']} sample rows (accepted with --allow-output-changes)"
        )
    text += f" ({how}, {dtype})"
    unstable = report["baseline"]["unstable_rows"]
    if unstable:
        text += (
            f"; the baseline's own passes differed in {unstable} rows, so texts are not "
            "reproducible here pass to pass"
        )
    if dtype != "float32" and (report["machine"]["gpu"] is None):
        text += "; --dtype float32 makes the comparison exact on a CPU"
    return text


def job_config_toml(
    job_keys: Mapping[str, Any], settings: Mapping[str, Any], header: list[str]
) -> str:
    """A job config (TOML, keys are `batchgen run`'s long flag names): the job's own keys with
    the tuned settings in place (`max-num-seqs`, `gpu-memory-utilization`, the rest as
    `engine-arg` entries, each replacing one of the job's with the same key)."""
    keys = dict(job_keys)
    flags = {**FIELD_FLAGS, **RUN_FLAGS}
    for key, flag in flags.items():
        if key in settings:
            keys[flag] = settings[key]
    args = [a for a in keys.get("engine-arg", ()) if _arg_key(a) not in settings]
    args += [f"{k}={json.dumps(v)}" for k, v in settings.items() if k not in flags]
    keys.pop("engine-arg", None)
    if args:
        keys["engine-arg"] = args
    lines = [f"# {line}" if line else "#" for line in header]
    lines.append("")
    lines += [f"{key} = {_toml_value(value)}" for key, value in keys.items() if value is not None]
    return "\n".join(lines) + "\n"


def write_job_config(path: Path, job_keys: Mapping[str, Any], report: dict[str, Any]) -> None:
    """Write the winner's job config to `path`, its header saying how it was found."""
    w, b = report["winner"], report["baseline"]
    tuned = w["settings"]
    header = [
        f"Written by `batchgen tune` (batchgen {__version__}) on "
        f"{datetime.date.today().isoformat()}: the job's own settings"
        + (
            " plus the engine settings that ran fastest"
            if tuned
            else "; no engine setting beat them"
        )
        + f" on a sample of {report['sample']['rows']} of its rows.",
        f"Gain over the baseline, measured in the same tune: {report['gain']:.3f} "
        f"({w['output_tok_s']:,.1f} vs {b['output_tok_s']:,.1f} output tok/s, medians of "
        f"{report['repeats']} passes) on {_machine(report)}.",
    ]
    for knob in KNOBS:
        if knob.key in tuned:
            header.append(f"{settings_text({knob.key: tuned[knob.key]})}: {knob.outputs}.")
    header.append(_outputs_line(report) + ".")
    header.append(f"Run it: batchgen run --config {path}")
    path.write_text(job_config_toml(job_keys, tuned, header))


def _machine(report: dict[str, Any]) -> str:
    m = report["machine"]
    return m["gpu"] or f"{m['cpu']} ({m['cpus_usable']} cores)"


def _arg_key(arg: str) -> str:
    return arg.partition("=")[0].replace("-", "_")


def _toml_value(value: Any) -> str:
    """TOML for the values job configs hold: text, numbers, booleans and lists of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__} {value!r}")
