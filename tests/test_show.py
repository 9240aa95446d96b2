"""`batchgen show OUT`: committed rows laid out for a person; filters, sampling, wrapping, the
pager on a terminal, and its refusals. The folder comes from a fake-engine run whose per-row
budgets make some rows finish by "length" and others by "stop"."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BATCHGEN, FAKE_ENGINE, read_output, run_args, run_cli

PROMPTS = [
    "What is the capital of France?",
    None,
    "Summarize: the committee postponed its decision until the spring, citing incomplete cost "
    "estimates and a need for more public consultation on the new bike lanes.",
    "Name three primary colors.",
    "Why is the sky blue?",
]
TOPICS = ["geo", "none", "civic", "art", "science"]
BUDGETS = [4, 4, 16, 16, 4]  # the fake engine writes 8 tokens: 4 ends by length, 16 by stop


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("show")
    src = base / "in.parquet"
    table = {"prompt": pa.array(PROMPTS, pa.string()), "topic": TOPICS, "budget": BUDGETS}
    pq.write_table(pa.table(table), src, row_group_size=2)
    out = base / "out"
    flags = ["--keep-prompt", "--keep-columns", "topic", "--max-tokens-column", "budget"]
    extra = [*flags, "--rows-per-shard", "2", "--max-error-rate", "1", *FAKE_ENGINE]
    run_cli(*run_args(src, out, *extra))
    return out


@pytest.fixture(autouse=True)
def columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "72")


@pytest.fixture(scope="module")
def rows(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_output(out).to_pylist()}


def test_every_row_in_output_order(out, rows):
    text = {i: rows[f"in.parquet:{i}"]["text"] for i in (0, 2, 3, 4)}
    tokens = {i: rows[f"in.parquet:{i}"]["prompt_tokens"] for i in range(5)}
    result = run_cli("show", out)
    assert result.output == "\n".join(
        [
            f"{out}: 5 committed rows in 3 shards; showing 5",
            "",
            f"== in.parquet:0 | length | {tokens[0]} prompt + 4 output tokens",
            "topic    geo",
            "prompt   What is the capital of France?",
            f"text     {text[0]}",
            "",
            "== in.parquet:1 | error row",
            "topic    none",
            "error    column 'prompt' is null",
            "",
            f"== in.parquet:2 | stop | {tokens[2]} prompt + 8 output tokens",
            "topic    civic",
            "prompt   Summarize: the committee postponed its decision until the",
            "         spring, citing incomplete cost estimates and a need for more",
            "         public consultation on the new bike lanes.",
            f"text     {text[2]}",
            "",
            f"== in.parquet:3 | stop | {tokens[3]} prompt + 8 output tokens",
            "topic    art",
            "prompt   Name three primary colors.",
            f"text     {text[3]}",
            "",
            f"== in.parquet:4 | length | {tokens[4]} prompt + 4 output tokens",
            "topic    science",
            "prompt   Why is the sky blue?",
            f"text     {text[4]}",
            "",
        ]
    )


def test_where_errors_and_ids_filter(out, rows):
    tokens = rows["in.parquet:4"]["prompt_tokens"]
    result = run_cli("show", out, "--where", "finish_reason=length", "--where", "topic!=geo")
    assert result.output == "\n".join(
        [
            f"{out}: 5 committed rows in 3 shards; 1 matching finish_reason=length, topic!=geo; "
            "showing 1",
            "",
            f"== in.parquet:4 | length | {tokens} prompt + 4 output tokens",
            "topic    science",
            "prompt   Why is the sky blue?",
            f"text     {rows['in.parquet:4']['text']}",
            "",
        ]
    )
    result = run_cli("show", out, "--errors")
    assert result.output == "\n".join(
        [
            f"{out}: 5 committed rows in 3 shards; 1 matching error rows; showing 1",
            "",
            "== in.parquet:1 | error row",
            "topic    none",
            "error    column 'prompt' is null",
            "",
        ]
    )
    result = run_cli("show", out, "--id", "in.parquet:3", "--id", "in.parquet:0", "--limit", "1")
    # --limit 1 is met in the first shard: the others are not read (a fleet's 10,000 shards
    # would be), so the count of every match is not known; the committed rows come from the
    # manifests.
    assert result.output.splitlines()[0] == (
        f"{out}: 5 committed rows in 3 shards; the first 1 matching id in.parquet:3 or "
        "in.parquet:0; showing 1"
    )
    assert result.output.splitlines()[2].startswith("== in.parquet:0 | length | ")
    result = run_cli("show", out, "--where", "completion_tokens=8")
    assert [line for line in result.output.splitlines() if line.startswith("==")] == [
        f"== in.parquet:{i} | stop | {rows[f'in.parquet:{i}']['prompt_tokens']} prompt + 8 "
        "output tokens"
        for i in (2, 3)
    ]


def test_sample_is_seeded_and_printed_in_output_order(out):
    def shown(seed: str) -> list[str]:
        result = run_cli("show", out, "--sample", "2", "--seed", seed)
        assert result.output.splitlines()[0] == (f"{out}: 5 committed rows in 3 shards; showing 2")
        return [
            line.split(" | ")[0][3:] for line in result.output.splitlines() if line[:3] == "== "
        ]

    picks = {seed: shown(seed) for seed in ("1", "2", "3", "4")}
    assert picks["1"] == shown("1")
    for ids in picks.values():
        assert len(ids) == 2 and ids == sorted(ids)
    assert len({tuple(ids) for ids in picks.values()}) > 1  # the seed matters
    result = run_cli("show", out, "--sample", "9")  # more than there are: every row
    assert result.output.splitlines()[0] == f"{out}: 5 committed rows in 3 shards; showing 5"


def test_wraps_to_the_terminal_width(out, monkeypatch):
    monkeypatch.setenv("COLUMNS", "44")
    result = run_cli("show", out, "--id", "in.parquet:2")
    assert result.output.splitlines()[4:8] == [
        "prompt   Summarize: the committee postponed",
        "         its decision until the spring,",
        "         citing incomplete cost estimates",
        "         and a need for more public",
    ]
    # Every field line fits (the "==" line above them and the summary are not wrapped).
    assert max(len(line) for line in result.output.splitlines()[3:]) == 44


def test_a_terminal_gets_the_pager(out, tmp_path):
    """On a terminal the text goes through $PAGER (here a script that copies it to a file)."""
    import pty

    paged = tmp_path / "paged.txt"
    pager = tmp_path / "pager.sh"
    pager.write_text(f"#!/bin/sh\ncat > {paged}\n")
    pager.chmod(0o755)
    main, sub = pty.openpty()
    env = {**os.environ, "PAGER": str(pager), "COLUMNS": "72"}
    proc = subprocess.run(
        [str(BATCHGEN), "show", str(out), "--errors"],
        stdin=sub,
        stdout=sub,
        stderr=subprocess.PIPE,
        env=env,
        timeout=120,
    )
    os.close(sub)
    os.close(main)
    assert proc.returncode == 0, proc.stderr
    assert paged.read_text().splitlines()[2:] == [
        "== in.parquet:1 | error row",
        "topic    none",
        "error    column 'prompt' is null",
    ]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (
            ["--where", "reason=stop"],
            2,
            "Error: --where reason=stop: no column 'reason'; the output's columns are: id, "
            "sample_index, text, finish_reason, prompt_tokens, completion_tokens, error, request_key, reused_from, prompt, "
            "topic",
        ),
        (
            ["--where", "completion_tokens=many"],
            2,
            "Error: --where completion_tokens=many: 'completion_tokens' holds int32, and 'many' "
            "is not one",
        ),
        (
            ["--where", "finish_reason"],
            2,
            "Error: --where 'finish_reason': expected COLUMN=VALUE or COLUMN!=VALUE, e.g. --where "
            "finish_reason=length",
        ),
        (["--seed", "3"], 2, "Error: --seed goes with --sample N"),
    ],
    ids=["no-such-column", "wrong-type", "no-operator", "seed-alone"],
)
def test_refusals(out, args, code, message):
    result = run_cli("show", out, *args, expect=code)
    assert result.output.splitlines()[-1] == message


def test_not_an_output_folder(tmp_path):
    result = run_cli("show", tmp_path / "nothing", expect=1)
    assert result.output == (
        f"Error: {tmp_path / 'nothing'}: no such folder; give the --output folder of a run\n"
    )
    result = run_cli("show", tmp_path, expect=1)
    assert result.output == (
        f"Error: {tmp_path}: no batchgen run there (no rank-*/part-*.parquet shards and no .batchgen); "
        "give the --output folder of a run\n"
    )


def test_reads_only_committed_shards(out, tmp_path):
    """A shard still being written (a hidden temporary file) is not shown."""
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    pq.write_table(
        pq.read_table(copy / "rank-00000" / "part-00000-000000.parquet"),
        copy / "rank-00000" / ".tmp-part-x.parquet",
    )
    result = run_cli("show", copy, "--limit", "1")
    assert result.output.splitlines()[0] == f"{copy}: 5 committed rows in 3 shards; showing 1"
