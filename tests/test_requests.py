"""Per-row requests on the fake engine: structured-output flags and their refusals, per-row
settings and schemas (a bad one is that row's error), parsed_ok, logprob columns, resume
refusal on a changed constraint, and shards cut early when logprobs pile up. The same requests
on the real engine, compared with raw vLLM, are in tests/test_requests_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAKE_ENGINE, read_output, run_args, run_cli, write_prompts

from pipeline import structured

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["label"],
}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_prompts(tmp_path / "in.parquet", [f"Question {i}?" for i in range(6)])


@pytest.fixture
def schema_file(tmp_path: Path) -> Path:
    path = tmp_path / "label.schema.json"
    path.write_text(json.dumps(SCHEMA))
    return path


def usage_error(src: Path, out: Path, *flags: str) -> str:
    result = run_cli(*run_args(src, out, *FAKE_ENGINE, *flags), expect=2)
    assert not out.exists() or not list(out.glob("rank-*/part-*")), "nothing is written"
    return result.output.splitlines()[-1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--choice", "yes", "--choice", "no", "--regex", "y.*"],
            "Error: use just one kind of structured output per run, not --choice and --regex "
            "(one of --json-schema, --choice, --regex, --grammar, --json-schema-column); "
            "per-row constraints go in --sampling-column",
        ),
        (
            ["--choice", "yes"],
            "Error: --choice yes: give at least two choices (with one, the answer is known in "
            "advance)",
        ),
        (
            ["--regex", "(unclosed"],
            "Error: --regex (unclosed: the regex does not compile (missing ), unterminated "
            "subpattern at position 0)",
        ),
        (["--logprobs", "-1"], "Error: --logprobs -1: must be 0 (the chosen token only) or more"),
        (
            ["--presence-penalty", "3"],
            "Error: --presence-penalty 3.0: must be in [-2, 2]",
        ),
    ],
    ids=["two-kinds", "one-choice", "bad-regex", "negative-logprobs", "penalty-range"],
)
def test_bad_request_flags_are_usage_errors(src, tmp_path, flags, message):
    assert usage_error(src, tmp_path / "out", *flags) == message


def test_schema_files_that_are_not_json_or_not_a_schema_are_usage_errors(src, tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    line = usage_error(src, tmp_path / "out", "--json-schema", str(bad_json))
    assert line.startswith(f"Error: --json-schema {bad_json}: not JSON (Expecting property name")
    not_schema = tmp_path / "not-schema.json"
    not_schema.write_text('{"type": "banana"}')
    line = usage_error(src, tmp_path / "out", "--json-schema", str(not_schema))
    assert line.startswith(f"Error: --json-schema {not_schema}: not a valid JSON Schema at type:")


def test_per_row_settings_bad_keys_and_values_are_that_rows_error(tmp_path):
    settings = [
        json.dumps({"temperature": 0.7, "n": 2, "seed": 11}),
        json.dumps({"temprature": 0.7}),
        json.dumps({"n": 0}),
        "{not json",
        json.dumps({"choice": ["a", "b"], "max_tokens": 20}),
        None,
    ]
    src = write_prompts(tmp_path / "in.parquet", [f"q{i}" for i in range(6)], cfg=settings)
    out = tmp_path / "out"
    run_cli(*run_args(src, out, *FAKE_ENGINE, "--sampling-column", "cfg", "--max-error-rate", "1"))
    rows = read_output(out).sort_by([("id", "ascending"), ("sample_index", "ascending")])
    by_id: dict[str, list[dict]] = {}
    for r in rows.to_pylist():
        by_id.setdefault(r["id"], []).append(r)
    assert [r["sample_index"] for r in by_id["in.parquet:0"]] == [0, 1]  # its own n
    assert json.loads(by_id["in.parquet:0"][0]["sampling"])["seed"] == 11
    assert by_id["in.parquet:1"][0]["error"].startswith(
        "--sampling-column 'cfg': unknown key 'temprature'; valid keys: choice, "
    )
    assert by_id["in.parquet:2"][0]["error"] == ("--sampling-column 'cfg': n=0: must be at least 1")
    assert by_id["in.parquet:3"][0]["error"].startswith(
        "--sampling-column 'cfg' is text but not JSON ("
    )
    row4 = by_id["in.parquet:4"][0]
    assert row4["text"] in ("a", "b") and row4["parsed_ok"] is True
    assert row4["completion_tokens"] == 8 and json.loads(row4["sampling"])["max_tokens"] == 20
    assert by_id["in.parquet:5"][0]["error"] is None  # null settings: the run's own
    assert by_id["in.parquet:5"][0]["parsed_ok"] is None  # and no constraint to check


def test_a_malformed_schema_in_one_row_is_that_rows_error_before_the_engine(tmp_path):
    schemas = [json.dumps(SCHEMA), "{oops", json.dumps({"type": 5}), json.dumps(SCHEMA)]
    src = write_prompts(tmp_path / "in.parquet", [f"q{i}" for i in range(4)], schema=schemas)
    out = tmp_path / "out"
    run_cli(
        *run_args(src, out, *FAKE_ENGINE, "--json-schema-column", "schema", "--max-error-rate", "1")
    )
    errors = read_output(out).sort_by("id").column("error").to_pylist()
    assert errors[0] is None and errors[3] is None
    assert errors[1].startswith("--json-schema-column 'schema': the schema is not JSON (")
    assert errors[2].startswith("--json-schema-column 'schema': not a valid JSON Schema at type: ")


@pytest.mark.parametrize(
    ("kind", "value", "text", "finish", "ok"),
    [
        ("json_schema", SCHEMA, '{"label": "yes"}', "stop", True),
        ("json_schema", SCHEMA, '{"label": "maybe"}', "stop", False),
        ("json_schema", SCHEMA, '{"label": "yes"', "stop", False),
        ("json_schema", SCHEMA, '{"label": "yes"}', "length", False),
        ("choice", ["yes", "no"], "no", "stop", True),
        ("choice", ["yes", "no"], "no ", "stop", False),
        ("regex", r"\d{3}-\d{4}", "555-1234", "stop", True),
        ("regex", r"\d{3}-\d{4}", "555-12345", "stop", False),
        ("grammar", 'root ::= "a"', "a", "stop", None),
        ("choice", ["yes", "no"], None, None, None),
    ],
)
def test_parsed_ok(kind, value, text, finish, ok):
    assert structured.parsed_ok(kind, value, text, finish) is ok


def test_logprob_columns_are_typed_and_shards_are_cut_when_they_pile_up(tmp_path, monkeypatch):
    from pipeline import stages

    src = write_prompts(tmp_path / "in.parquet", [f"q{i}" for i in range(40)])
    out = tmp_path / "out"
    # 40 prompts x 8 tokens x (1 + 5) entries = 1,920 entries: a cap of 500 cuts ~4 shards
    monkeypatch.setattr(stages, "MAX_SHARD_ENTRIES", 500)
    run_cli(
        *run_args(src, out, *FAKE_ENGINE, "--logprobs", "5", "--prompt-logprobs", "1"),
        "--max-num-seqs",
        "10",
    )
    shards = sorted(out.glob("rank-*/part-*.parquet"))
    assert len(shards) >= 3, shards
    schema = pq.read_schema(shards[0])
    entry = schema.field("logprobs").type.value_type
    assert [f.name for f in entry] == ["token_id", "token", "logprob", "top"]
    assert schema.field("cumulative_logprob").type == pa.float64()
    row = read_output(out).sort_by("id").to_pylist()[0]
    assert len(row["logprobs"]) == row["completion_tokens"] == 8
    assert all(len(e["top"]) == 5 for e in row["logprobs"])
    assert row["cumulative_logprob"] == pytest.approx(sum(e["logprob"] for e in row["logprobs"]))
    assert row["prompt_logprobs"][0]["logprob"] is None  # the first prompt token has none
    assert len(row["prompt_logprobs"]) == row["prompt_tokens"]


@pytest.mark.parametrize(
    ("first", "second", "line"),
    [
        (
            ["--choice", "yes", "--choice", "no"],
            ["--choice", "yes", "--choice", "no", "--choice", "maybe"],
            'sampling.choice: ["yes", "no"] -> ["yes", "no", "maybe"]',
        ),
        (["--logprobs", "2"], ["--logprobs", "3"], "sampling.logprobs: 2 -> 3"),
    ],
    ids=["choice-list", "logprobs"],
)
def test_resume_with_a_changed_request_setting_is_refused_naming_it(
    src, tmp_path, first, second, line
):
    out = tmp_path / "out"
    run_cli(*run_args(src, out, *FAKE_ENGINE, *first))
    result = run_cli(*run_args(src, out, *FAKE_ENGINE, *second), expect=1)
    assert f"\n  {line}\n" in result.output, result.output


def test_resume_with_an_edited_schema_file_is_refused_naming_the_file(src, tmp_path, schema_file):
    out = tmp_path / "out"
    run_cli(*run_args(src, out, *FAKE_ENGINE, "--json-schema", str(schema_file)))
    schema_file.write_text(json.dumps({**SCHEMA, "required": []}))
    result = run_cli(*run_args(src, out, *FAKE_ENGINE, "--json-schema", str(schema_file)), expect=1)
    assert "\n  sampling.json_schema.required: " in result.output
    assert "\n  sampling.json_schema_file.sha256: " in result.output
