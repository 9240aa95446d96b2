"""Runs that are mostly errors: column types checked before any engine time, blank prompts,
--max-error-rate at the end of a run and the early stop of a hopeless one. Error rows are data:
they are committed either way; what changes is the exit code and the recorded state."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAKE_ENGINE, manifest_state, read_output, run_args, run_cli, write_prompts

from pipeline.stages import Feeder


def manifest(out: Path) -> dict:
    return manifest_state(out)


@pytest.mark.parametrize(
    ("column", "flags", "message"),
    [
        (
            pa.array([1, 2], pa.int64()),
            ["--prompt-column", "p"],
            "--prompt-column 'p' has type int64, but it must hold text (string); use --template "
            "'{p}' to format it into text",
        ),
        (
            pa.array([1.5, 2.5]),
            ["--messages-column", "p"],
            "--messages-column 'p' has type double, but it must hold a list of messages or text; "
            "store messages as [{role, content}, ...] or JSON text",
        ),
    ],
    ids=["integer-prompts", "float-messages"],
)
def test_a_column_of_the_wrong_type_is_a_usage_error_before_any_row(
    tmp_path: Path, column: pa.Array, flags: list[str], message: str
) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"p": column}), src)
    out = tmp_path / "out"
    result = run_cli("run", "--parquet", src, *flags, *FAKE_ENGINE, "--output", out, expect=2)
    assert result.output.endswith(f"\nError: {message}\n"), result.output
    assert not list(out.glob("rank-*/part-*.parquet"))


def test_an_integer_column_formatted_by_a_template_runs(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"p": pa.array([1, 2], pa.int64())}), src)
    out = tmp_path / "out"
    run_cli("run", "--parquet", src, "--template", "Number {p}", *FAKE_ENGINE, "-o", out)
    assert read_output(out).column("error").null_count == 2


def test_blank_and_empty_prompts_are_error_rows(tmp_path: Path) -> None:
    prompts = ["fine"] * 18 + ["", " \n\t "]
    src = write_prompts(tmp_path / "in.parquet", prompts)
    out = tmp_path / "out"
    run_cli(*run_args(src, out, *FAKE_ENGINE, "--max-error-rate", "0.1"))
    errors = dict(zip(*read_output(out).select(["id", "error"]).to_pydict().values(), strict=True))
    assert errors["in.parquet:18"] == "the prompt is empty"
    assert errors["in.parquet:19"] == "the prompt is blank"
    assert sum(e is None for e in errors.values()) == 18


def test_a_run_over_the_error_rate_commits_everything_exits_1_and_says_where_to_look(
    tmp_path: Path,
) -> None:
    prompts: list[str | None] = [f"q{i}" for i in range(10)]
    prompts[2] = prompts[5] = prompts[7] = None
    src = write_prompts(tmp_path / "in.parquet", prompts)
    out = tmp_path / "out"
    result = run_cli(*run_args(src, out, *FAKE_ENGINE), expect=1)
    assert result.output.splitlines()[-1] == (
        f"Error: 3 of 10 rows of rank 0 (30.0%) are error rows, above --max-error-rate 0.1; "
        f"every row is committed in {out}: see why in their `error` column (e.g. duckdb -c "
        f"\"select error, count(*) from '{out}/*/*.parquet' group by error\"), fix the input or "
        "flags and rerun with --overwrite, or rerun with a higher --max-error-rate to accept them"
    )
    assert read_output(out).num_rows == 10
    state = manifest(out)
    assert state["status"] == "failed" and "above --max-error-rate 0.1" in state["report"]["error"]
    assert run_cli("status", out, expect=4).output.count("error: 3 of 10 rows") == 1
    # Rerun with the same flags: nothing to redo, the same verdict.
    run_cli(*run_args(src, out, *FAKE_ENGINE), expect=1)
    # Accepting the rate finishes the run without regenerating anything.
    run_cli(*run_args(src, out, *FAKE_ENGINE, "--max-error-rate", "0.5"))
    assert manifest(out)["status"] == "finished"
    assert read_output(out).num_rows == 10
    run_cli("status", out, expect=0)


@pytest.fixture
def input_read_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The order a loaded machine can produce: the feeder reads the whole input (it fits in its
    queue) before the engine gets its first row, so it has read everything when the run stops."""
    feed = Feeder.feed

    def feed_after_the_whole_input(self: Feeder):
        deadline = time.monotonic() + 60
        while not self.exhausted:
            assert time.monotonic() < deadline, "the feeder did not read the whole input"
            time.sleep(0.01)
        yield from feed(self)

    monkeypatch.setattr(Feeder, "feed", feed_after_the_whole_input)


@pytest.mark.parametrize("order", ["any", "input-read-first"])
def test_a_hopeless_run_stops_early_after_1000_prompts(
    tmp_path: Path, request: pytest.FixtureRequest, order: str
) -> None:
    if order == "input-read-first":
        request.getfixturevalue("input_read_first")
    prompts: list[str | None] = [None] * 5000
    prompts[0] = "the only good prompt"
    src = write_prompts(tmp_path / "in.parquet", prompts, row_group_size=100)
    out = tmp_path / "out"
    result = run_cli(
        *run_args(src, out, *FAKE_ENGINE, "--rows-per-shard", "100", "--max-num-seqs", "4"),
        expect=1,
    )
    last = result.output.splitlines()[-1]
    assert last.startswith("Error: stopped early: "), last
    committed = read_output(out).num_rows
    assert 1000 <= committed < 5000, committed
    assert manifest(out)["status"] == "failed"
    # --max-error-rate 1 accepts any rate: the rest is then done, exactly once.
    run_cli(*run_args(src, out, *FAKE_ENGINE, "--rows-per-shard", "100", "--max-error-rate", "1"))
    ids = read_output(out).column("id").to_pylist()
    assert sorted(ids) == sorted({f"in.parquet:{i}" for i in range(5000)})
