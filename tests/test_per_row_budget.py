"""--max-tokens-column and --ignore-eos: per-row output budgets (what `batchgen bench` uses to mix
output lengths), their validation, and their place in the resume fingerprint. Fake engine: it
answers min(budget, 8) tokens, "length" when the budget is what stopped it."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from conftest import FAKE_ENGINE, read_output, run_args, run_cli, write_prompts

from pipeline.sampling import SamplingConfig


def budget_input(tmp_path: Path, budgets: pa.Array) -> Path:
    prompts = [f"Prompt number {i}" for i in range(len(budgets))]
    return write_prompts(tmp_path / "in.parquet", prompts, budget=budgets)


def budget_args(src: Path, out: Path, *extra: str) -> list[str]:
    return run_args(src, out, "--max-tokens-column", "budget", *FAKE_ENGINE, *extra, max_tokens=5)


def rows_by_id(out: Path) -> list[dict]:
    return read_output(out).sort_by("id").to_pylist()


def test_each_row_gets_its_own_budget(tmp_path: Path) -> None:
    src = budget_input(tmp_path, pa.array([3, None, 20, 0, -2], pa.int64()))
    # The bad budgets are error rows on purpose: accept them (--max-error-rate 1), exit 0.
    run_cli(*budget_args(src, tmp_path / "out", "--max-error-rate", "1"))
    rows = rows_by_id(tmp_path / "out")
    got = [(r["completion_tokens"], r["finish_reason"], r["error"]) for r in rows]
    assert got == [
        (3, "length", None),
        (5, "length", None),  # null: the run's --max-tokens
        (8, "stop", None),  # the fake stops at 8 on its own
        (None, None, "--max-tokens-column 'budget' holds 0; expected a whole number >= 1"),
        (None, None, "--max-tokens-column 'budget' holds -2; expected a whole number >= 1"),
    ]


def test_whole_floats_count_as_budgets(tmp_path: Path) -> None:
    """pandas writes an integer column with nulls as float64."""
    src = budget_input(tmp_path, pa.array([4.0, 2.5, float("nan")], pa.float64()))
    run_cli(*budget_args(src, tmp_path / "out", "--max-error-rate", "1"))
    rows = rows_by_id(tmp_path / "out")
    assert rows[0]["completion_tokens"] == 4 and rows[0]["error"] is None
    assert rows[1]["error"] == (
        "--max-tokens-column 'budget' holds 2.5; expected a whole number >= 1"
    )
    assert rows[2]["error"] == (
        "--max-tokens-column 'budget' holds nan; expected a whole number >= 1"
    )


def test_unknown_budget_column_is_a_usage_error(tmp_path: Path) -> None:
    src = budget_input(tmp_path, pa.array([3], pa.int64()))
    args = budget_args(src, tmp_path / "out")
    args[args.index("budget")] = "budgt"
    result = run_cli(*args, expect=2)
    assert result.output.endswith(
        "\nError: --max-tokens-column 'budgt': no such column (did you mean 'budget'?); the input's "
        "columns are: "
        "prompt, budget\n"
    ), result.output


@pytest.mark.parametrize(
    "change, line",
    [
        (["--ignore-eos"], "sampling.ignore_eos: (not set) -> true"),
        (["--max-tokens-column", "other"], "sampling.max_tokens_column: budget -> other"),
    ],
    ids=["ignore-eos", "other-column"],
)
def test_resume_refuses_a_changed_budget_setting(
    tmp_path: Path, change: list[str], line: str
) -> None:
    path = write_prompts(tmp_path / "in.parquet", ["a", "b"], budget=[1, 2], other=[3, 4])
    out = tmp_path / "out"
    run_cli(*budget_args(path, out))
    args = budget_args(path, out)
    if change[0] == "--max-tokens-column":
        args[args.index("budget")] = change[1]
    else:
        args += change
    result = run_cli(*args, expect=1)
    assert f"\n  {line}\n" in result.output, result.output


def test_unused_budget_flags_leave_the_sampling_record_unchanged() -> None:
    """Runs that never use them keep the fingerprint they had before the flags existed."""
    resolved = SamplingConfig.of(max_tokens=5, temperature=0.0).resolve({})
    assert "ignore_eos" not in resolved and "max_tokens_column" not in resolved
    resolved = SamplingConfig.of(ignore_eos=True, max_tokens_column="b").resolve({})
    assert resolved["ignore_eos"] is True and resolved["max_tokens_column"] == "b"
