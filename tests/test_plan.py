"""`batchgen plan` on the fake engine's settings: its counts are checked against the rows a run
with the same flags writes (error rows by kind, prompt tokens), its whole text output, --json,
what it reads from an earlier run in --output, every rank, --calibrate and its exit codes.
(tests/test_plan_engine.py checks it against the real engine.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    FAKE_ENGINE,
    REPO,
    manifest_state,
    read_output,
    run_args,
    run_cli,
    save_manifest_state,
)

from pipeline.models import ensure_bundled_model
from pipeline.prompts import error_kind

CONTEXT = ["--max-model-len", "64"]
MODEL = str(ensure_bundled_model())


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 plain prompts: 7 good ones, a null, an empty, a blank and two over 64 tokens."""
    prompts: list[str | None] = [f"Say something about {i}." for i in range(12)]
    prompts[2], prompts[4], prompts[5] = None, "", "   "
    prompts[7], prompts[9] = "word " * 100, "many words " * 80
    path = tmp_path_factory.mktemp("plan") / "mixed.parquet"
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string())}), path)
    return path


@pytest.fixture(scope="module")
def mixed_run(mixed: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What a fake run with the same flags writes, row by row."""
    out = tmp_path_factory.mktemp("plan-run") / "out"
    run_cli(*run_args(mixed, out, *FAKE_ENGINE, *CONTEXT, "--max-error-rate", "1", max_tokens=16))
    return sorted(read_output(out).to_pylist(), key=lambda r: int(r["id"].split(":")[1]))


def plan_args(src: Path, *extra: str, max_tokens: int = 16) -> list[str]:
    """`batchgen plan` with the flags `run_args` gives a run, on the fake engine."""
    return [
        "plan",
        "--parquet",
        str(src),
        "--prompt-column",
        "prompt",
        "--max-tokens",
        str(max_tokens),
        *FAKE_ENGINE,
        *extra,
    ]


def nearest_rank(values: list[int], q: int) -> int:
    ordered = sorted(values)
    return ordered[math.ceil(q / 100 * len(ordered)) - 1]


def test_counts_match_the_run_and_the_text_says_why_it_cannot_run(mixed, mixed_run):
    good = [r["prompt_tokens"] for r in mixed_run if r["error"] is None]
    long = {r["id"]: r["prompt_tokens"] for r in mixed_run if r["prompt_tokens"] and r["error"]}
    assert len(good) == 7 and sorted(long) == ["mixed.parquet:7", "mixed.parquet:9"]
    result = run_cli(*plan_args(mixed, *CONTEXT), expect=1)
    pcts = ", ".join(f"p{q} {nearest_rank(good, q)}" for q in (50, 90, 99))
    assert result.output.splitlines() == [
        f"plan: {mixed} -> (no --output) (one rank)",
        f"  model: {MODEL}, context 64 tokens (--max-model-len)",
        "  prompts: 12 in the input, 0 committed, 12 to do (12 output rows with --n 1)",
        "  error rows: 5 of 12 prompts to do (41.7%)",
        f"    over-long      2  longest: mixed.parquet:9 ({long['mixed.parquet:9']} tokens), "
        f"mixed.parquet:7 ({long['mixed.parquet:7']} tokens); the context is 64",
        "    blank          1  e.g. mixed.parquet:5: the prompt is blank",
        "    empty          1  e.g. mixed.parquet:4: the prompt is empty",
        "    null           1  e.g. mixed.parquet:2: column 'prompt' is null",
        f"  prompt tokens: {sum(good)} over 7 prompts | min {min(good)}, mean "
        f"{sum(good) / 7:.1f}, {pcts}, max {max(good)}",
        "  output tokens: at most 112 (max_tokens 16 x 7 prompts x n 1, each capped by the "
        "context)",
        "  expected output tokens: unknown (no --output with an earlier run; --calibrate "
        "SECONDS measures one)",
        "  ETA: none (no --output with an earlier run; --calibrate SECONDS measures one)",
        "cannot run: 5 of 12 rows (41.7%) would be error rows, above --max-error-rate 0.1, so "
        "the run would end with exit 1; fix the input or flags, or raise --max-error-rate",
    ]


def test_json_counts_equal_the_runs_rows(mixed, mixed_run):
    result = run_cli(*plan_args(mixed, *CONTEXT, "--max-error-rate", "0.5", "--json"))
    assert len(result.stdout.splitlines()) == 1
    got = json.loads(result.stdout)
    todo = got["all"]["todo"]
    errors = [r for r in mixed_run if r["error"] is not None]
    assert todo["error_rows"] == len(errors) == 5
    kinds: dict[str, int] = {}
    for r in errors:
        kinds[error_kind(r["error"])] = kinds.get(error_kind(r["error"]), 0) + 1
    assert {k: v["prompts"] for k, v in todo["errors"].items()} == kinds
    assert todo["errors"]["null"] == {
        "prompts": 1,
        "examples": ["mixed.parquet:2"],
        "message": next(r["error"] for r in errors if r["id"] == "mixed.parquet:2"),
    }
    assert todo["prompt_tokens"]["total"] == sum(
        r["prompt_tokens"] for r in mixed_run if r["error"] is None and r["sample_index"] == 0
    )
    assert todo["over_long_worst"] == sorted(
        ({"id": r["id"], "tokens": r["prompt_tokens"]} for r in errors if r["prompt_tokens"]),
        key=lambda w: -w["tokens"],
    )
    assert (todo["prompts"], todo["rows"], todo["samples"], todo["output_token_ceiling"]) == (
        12,
        12,
        7,
        7 * 16,
    )
    assert {k: got[k] for k in ("can_run", "reasons", "exit_code", "eta", "calibration")} == {
        "can_run": True,
        "reasons": [],
        "exit_code": 0,
        "eta": None,
        "calibration": None,
    }
    assert (got["max_model_len"], got["max_model_len_from"], got["model"]) == (
        64,
        "--max-model-len",
        MODEL,
    )


def test_the_context_comes_from_the_models_config_without_max_model_len(mixed):
    got = json.loads(run_cli(*plan_args(mixed, "--json"), expect=1).stdout)
    assert (got["max_model_len"], got["max_model_len_from"]) == (
        8192,
        "the model's max_position_embeddings; --max-model-len overrides",
    )
    assert "over-long" not in got["all"]["todo"]["errors"]


def test_output_ceiling_is_capped_by_the_context(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["Say something about 1."] * 3}), src)
    result = run_cli(
        *plan_args(src, *CONTEXT, "--n", "2", "--temperature", "1", "--json", max_tokens=100)
    )
    got = json.loads(result.stdout)
    tokens = got["all"]["todo"]["prompt_tokens"]["max"]
    assert got["all"]["todo"]["output_token_ceiling"] == 3 * 2 * (64 - tokens)
    assert (got["all"]["todo"]["rows"], got["all"]["todo"]["samples"]) == (6, 6)


@pytest.mark.parametrize(
    "prompts, reason",
    [
        (
            [None, None, None],
            "cannot run: every one of the 3 prompts to do is an error row (null 3); fix the "
            "input or the prompt flags",
        ),
        ([], "cannot run: the input has no rows: there is nothing to generate"),
    ],
    ids=["all-errors", "empty"],
)
def test_a_job_that_cannot_run_exits_1_naming_why(tmp_path, prompts, reason):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string())}), src)
    result = run_cli(*plan_args(src, *CONTEXT), expect=1)
    assert result.output.splitlines()[-1] == reason
    got = json.loads(run_cli(*plan_args(src, *CONTEXT, "--json"), expect=1).stdout)
    assert (got["can_run"], got["reasons"], got["exit_code"]) == (
        False,
        [reason.removeprefix("cannot run: ")],
        1,
    )


def test_an_output_with_other_settings_is_refused_unless_overwrite(prompts_file, tmp_path):
    out = tmp_path / "out"
    run_cli(*run_args(prompts_file, out, *FAKE_ENGINE, *CONTEXT, max_tokens=8))
    args = plan_args(prompts_file, *CONTEXT, "--output", str(out), max_tokens=9)
    result = run_cli(*args, expect=1)
    assert result.output.splitlines()[-1] == (
        "cannot run: a run would be refused: --output holds a run with different settings "
        "(rank 0: sampling.max_tokens: 8 -> 9); rerun with its settings, pass --overwrite to "
        "start afresh, or choose another --output"
    )
    result = run_cli(*args, "--overwrite")
    assert "  prompts: 200 in the input, 0 committed, 200 to do" in result.output


def test_a_resume_plans_the_rest_from_the_earlier_runs_rate_and_outputs(prompts_file, tmp_path):
    out = tmp_path / "out"
    run_cli(*run_args(prompts_file, out, "--rows-per-shard", "50", *FAKE_ENGINE, *CONTEXT))
    state = manifest_state(out)
    state["shards"].pop()
    state["status"] = "interrupted"
    state["report"]["this_run"].update(prompts=150, errors=0, generate_seconds=6.0)
    save_manifest_state(out, state)
    (out / "rank-00000" / "part-00000-000003.parquet").unlink()
    result = run_cli(*plan_args(prompts_file, *CONTEXT, "--output", str(out), max_tokens=8))
    lines = result.output.splitlines()
    assert lines[2] == (
        "  prompts: 200 in the input, 150 committed, 50 to do (50 output rows with --n 1)"
    )
    assert lines[5:] == [
        "  output tokens: at most 400 (max_tokens 8 x 50 prompts x n 1, each capped by the "
        "context)",
        f"  expected output tokens: 400 (8.0 per output row, from 150 outputs committed in {out})",
        f"  ETA: 2.0s for the job: 2.0s of generation and an engine start of 0.0s, from the last "
        f"run's 25.00 prompts/s in {out}",
        "can run: 50 prompts to generate",
    ]


def test_all_ranks(prompts_file):
    result = run_cli(
        *plan_args(prompts_file, *CONTEXT, "--num-shards", "3", "--shard-index", "1", "--all-ranks")
    )
    lines = result.output.splitlines()
    assert lines[0] == f"plan: {prompts_file} -> (no --output) (all 3 ranks)"
    got = json.loads(
        run_cli(
            *plan_args(
                prompts_file,
                *CONTEXT,
                "--num-shards",
                "3",
                "--shard-index",
                "1",
                "--all-ranks",
                "--json",
            )
        ).stdout
    )
    sizes = [r["todo"]["prompts"] for r in got["ranks"]]
    assert sizes == [67, 67, 66]
    tokens = [r["todo"]["prompt_tokens"]["total"] for r in got["ranks"]]
    for r, n, t in zip(range(3), sizes, tokens, strict=True):
        assert lines[2 + r] == (
            f"  rank {r}: {n} in the input, 0 committed, {n} to do | 0 error rows | "
            f"{t:,} prompt tokens"
        )
    assert got["all"]["todo"]["prompt_tokens"]["total"] == sum(tokens)
    one = json.loads(
        run_cli(
            *plan_args(prompts_file, *CONTEXT, "--num-shards", "3", "--shard-index", "1", "--json")
        ).stdout
    )
    assert [r["rank"] for r in one["ranks"]] == [1]
    assert one["all"]["todo"] == got["ranks"][1]["todo"]


def test_calibrate_on_an_engine_that_finishes_the_whole_sample(prompts_file):
    result = run_cli(
        *plan_args(prompts_file, *CONTEXT, "--calibrate", "30", "--json", max_tokens=8)
    )
    got = json.loads(result.stdout)
    c = got["calibration"]
    assert (c["sample_prompts"], c["completed_prompts"], c["whole_job"]) == (200, 200, True)
    assert got["eta"]["generate_seconds"] == round(c["seconds"], 1)
    start = got["eta"]["engine_start_seconds"]
    assert abs(got["eta"]["seconds"] - (c["seconds"] + start)) <= 0.1
    assert got["expected_output_tokens"] == {
        "tokens": 200 * 8,
        "from": "--calibrate: 200 sampled outputs",
        "per_sample": 8.0,
    }
    text = run_cli(*plan_args(prompts_file, *CONTEXT, "--calibrate", "30", max_tokens=8)).output
    assert "    the sample was every prompt to do: its time is measured, not estimated" in text


def test_calibrate_must_be_positive(prompts_file):
    result = run_cli(*plan_args(prompts_file, "--calibrate", "0"), expect=2)
    assert "Invalid value for '--calibrate': 0.0 is not in the range x>0." in result.output


def test_a_repeated_id_is_named(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a b", "c d", "e f"], "key": ["x", "y", "x"]}), src)
    result = run_cli(*plan_args(src, *CONTEXT, "--id-column", "key"), expect=1)
    assert result.output == (
        "Error: --id-column 'key' repeats the id 'x' (rows 0 and 2); resume needs unique ids: pick a "
        "unique column or omit --id-column\n"
    )


def test_a_job_config_plans_like_run(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    args = ["plan", "--config", "jobs/examples/sample.toml", *FAKE_ENGINE, "--output", tmp_path]
    got = json.loads(run_cli(*args, "--json").stdout)
    todo = got["all"]["todo"]
    assert (got["input"], got["all"]["input_prompts"], todo["errors"]) == (
        "data/prompts.parquet",
        48,
        {},
    )
    assert todo["output_token_ceiling"] == 48 * 128  # max-tokens = 128 in the config
