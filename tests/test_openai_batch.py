"""Batch request files on the fake engine: each body field onto the row's own request, each bad
line an error row naming the line and the fix, a repeated custom_id refused naming both lines
(in memory and through the spilled hash partitions), the error budget, Anthropic lines, and
`batchgen export` checked with the `openai` package's own types, in input order even when the
shards overlap. The real engine against `vllm run-batch` is in tests/test_openai_batch_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAKE_ENGINE, read_output, run_cli

from pipeline.batchfile import parse_line
from pipeline.sources import openai_batch

MODEL = "SmolLM2-135M-Instruct"


def chat(custom_id: str, **body) -> dict:
    body.setdefault("messages", [{"role": "user", "content": f"Say {custom_id}"}])
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def completion(custom_id: str, **body) -> dict:
    body.setdefault("prompt", f"Once upon a time {custom_id}")
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def batch_run(src: Path, out: Path, *flags: str, expect: int | None = 0):
    args = ["run", "--openai-batch", src, "--output", out, "--max-tokens", "8"]
    return run_cli(*args, *FAKE_ENGINE, *flags, expect=expect)


def by_id(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_output(out).to_pylist() if r["sample_index"] == 0}


# --- body fields onto the row's own request -------------------------------------------------


@pytest.mark.parametrize(
    ("line", "sampling"),
    [
        (chat("a", max_tokens=5, temperature=0), {"max_tokens": 5, "temperature": 0.0}),
        (chat("a", max_completion_tokens=7, max_tokens=3), {"max_tokens": 7}),
        (chat("a", top_p=0.5, n=2, temperature=1), {"top_p": 0.5, "n": 2, "temperature": 1.0}),
        (chat("a", stop="END", seed=9), {"stop": ["END"], "seed": 9}),
        (
            chat("a", presence_penalty=0.5, frequency_penalty=-1),
            {"presence_penalty": 0.5, "frequency_penalty": -1.0},
        ),
        (chat("a", logprobs=True, top_logprobs=3), {"logprobs": 3}),
        (chat("a", logprobs=True), {"logprobs": 0}),
        (completion("a", logprobs=2, stop=["x", "y"]), {"logprobs": 2, "stop": ["x", "y"]}),
        (
            chat("a", response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
            {"json_schema": {}},
        ),
        (chat("a", response_format={"type": "json_object"}), {"json_schema": {"type": "object"}}),
        (chat("a", response_format={"type": "text"}), {}),
        (
            chat("a", top_k=5, min_p=0.1, repetition_penalty=1.1, ignore_eos=True),
            {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True},
        ),
        (chat("a", prompt_logprobs=1), {"prompt_logprobs": 1}),
        (chat("a", structured_outputs={"choice": ["yes", "no"]}), {"choice": ["yes", "no"]}),
        (chat("a", structured_outputs={"regex": "[0-9]+"}), {"regex": "[0-9]+"}),
        (chat("a", user="u1", metadata={"k": "v"}, store=False, stream=False), {}),
    ],
)
def test_body_fields_map_to_the_rows_settings(line, sampling):
    request = parse_line(json.dumps(line), 1, "in.jsonl")
    assert request.error is None
    assert request.sampling == sampling


def test_messages_parts_system_and_developer():
    line = chat(
        "a",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
            },
        ],
    )
    request = parse_line(json.dumps(line), 1, "in.jsonl")
    assert request.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "A\nB"},
    ]


def test_anthropic_lines_map_onto_the_same_request():
    line = {
        "custom_id": "m1",
        "params": {
            "model": MODEL,
            "max_tokens": 12,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [{"role": "user", "content": "Hello"}],
            "temperature": 0.2,
            "top_k": 4,
            "stop_sequences": ["\n\n"],
            "metadata": {"user_id": "x"},
        },
    }
    request = parse_line(json.dumps(line), 4, "in.jsonl")
    assert request.error is None
    assert (request.custom_id, request.url, request.model) == ("m1", "/v1/messages", MODEL)
    assert request.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]
    assert request.sampling == {"max_tokens": 12, "temperature": 0.2, "top_k": 4, "stop": ["\n\n"]}


# --- every bad line: an error row naming the line and the fix -------------------------------

BAD_LINES = [
    (
        "{not json",
        "line 2 of in.jsonl: not JSON (Expecting property name enclosed in double quotes at column 2); write one JSON object per line",
    ),
    ("[1, 2]", "line 2 of in.jsonl: a list, not a JSON object; write one object per line"),
    (
        {"method": "POST", "url": "/v1/chat/completions", "body": {}},
        'line 2 of in.jsonl: no custom_id; give every line a unique "custom_id": "..."',
    ),
    (
        {"custom_id": 7, "url": "/v1/chat/completions", "body": {}},
        "line 2 of in.jsonl: custom_id 7 is not a non-empty string; quote it",
    ),
    (
        {**chat("x"), "url": "/v1/embeddings"},
        "line 2 of in.jsonl: url '/v1/embeddings' is not served here; use '/v1/chat/completions' or '/v1/completions'",
    ),
    (
        {**chat("x"), "method": "GET"},
        "line 2 of in.jsonl: method 'GET'; batch requests are \"POST\"",
    ),
    (
        {"custom_id": "x", "url": "/v1/chat/completions"},
        'line 2 of in.jsonl: no "body" object; give the request\'s parameters in "body"',
    ),
    (
        chat("x", tools=[{"type": "function", "function": {"name": "f"}}]),
        "line 2 of in.jsonl: body.tools: batchgen cannot honour tool calling; remove 'tools' from the request",
    ),
    (
        chat("x", functions=[]),
        "line 2 of in.jsonl: body.functions: batchgen cannot honour function calling; remove 'functions' from the request",
    ),
    (
        chat("x", audio={"voice": "alloy"}),
        "line 2 of in.jsonl: body.audio: batchgen cannot honour audio output; remove 'audio' from the request",
    ),
    (
        chat("x", logit_bias={"1": 5}),
        "line 2 of in.jsonl: body.logit_bias: batchgen cannot honour logit bias; remove 'logit_bias' from the request",
    ),
    (
        chat(
            "x",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}],
                }
            ],
        ),
        "line 2 of in.jsonl: body.messages[0].content[0] is a image_url part; batchgen serves text parts only: remove it or send the text alone",
    ),
    (
        chat("x", messages=[{"role": "tool", "content": "42", "tool_call_id": "c1"}]),
        "line 2 of in.jsonl: body.messages[0].tool_call_id: batchgen cannot honour this field; remove 'tool_call_id' from the request",
    ),
    (
        chat("x", messages=[]),
        "line 2 of in.jsonl: body.messages is missing or empty; give a list of {role, content} messages",
    ),
    (
        chat("x", temperature=-1),
        "line 2 of in.jsonl: body.temperature=-1.0: must be 0 (greedy) or more; fix the value",
    ),
    (
        chat("x", n=2, temperature=0),
        "line 2 of in.jsonl: body.n=2 with temperature 0 would repeat one text; set a temperature above 0 or n 1",
    ),
    (
        chat("x", stream=True),
        "line 2 of in.jsonl: body.stream is true; batch results are whole responses: drop stream",
    ),
    (
        completion("x", prompt=["a", "b"]),
        "line 2 of in.jsonl: body.prompt is a list; batchgen takes one text prompt per line: split it into one line per prompt (token-id prompts are not supported)",
    ),
    (
        completion("x", echo=True),
        "line 2 of in.jsonl: body.echo: batchgen cannot honour this field; remove 'echo' from the request",
    ),
    (
        chat("x", top_logprobs=2),
        "line 2 of in.jsonl: body.top_logprobs needs body.logprobs true; set it",
    ),
    (
        chat("x", response_format={"type": "json_schema", "json_schema": {"schema": {"type": 5}}}),
        'line 2 of in.jsonl: body.response_format.json_schema.schema={"type": 5}: not a valid JSON Schema at type: 5 is not valid under any of the given schemas; fix the value',
    ),
    (
        chat("x", model="gpt-4o"),
        "line 2 of in.jsonl: model 'gpt-4o' is not served by this run; it serves ",
    ),
    (
        {
            "custom_id": "x",
            "params": {"model": MODEL, "messages": [{"role": "user", "content": "a"}]},
        },
        "line 2 of in.jsonl: params.max_tokens is missing; the Messages API requires it",
    ),
    (
        {"custom_id": "x", "params": {"max_tokens": 5, "tools": [], "messages": []}},
        "line 2 of in.jsonl: params.tools: batchgen cannot honour tool calling; remove 'tools' from the request",
    ),
]


@pytest.mark.parametrize(("bad", "message"), BAD_LINES)
def test_a_bad_line_is_its_own_error_row(tmp_path: Path, bad, message):
    src = write_lines(tmp_path / "in.jsonl", [chat("ok"), bad, "", chat("ok2")])
    out = tmp_path / "out"
    batch_run(src, out, "--max-error-rate", "1")
    rows = read_output(out).to_pylist()
    assert [r["position"] for r in rows] == [0, 1, 2], "the blank line is no row"
    assert rows[0]["error"] is None and rows[2]["error"] is None
    assert rows[1]["error"].startswith(message), rows[1]["error"]
    if message.endswith("it serves "):
        assert rows[1]["error"].endswith(
            f"'{MODEL}': set the line's model to one of them, or add the adapter with --lora"
        )


def test_the_error_budget_applies(tmp_path: Path):
    src = write_lines(tmp_path / "in.jsonl", [chat("ok"), chat("t", tools=[]), "nope"])
    out = tmp_path / "out"
    result = batch_run(src, out, expect=1)
    assert (
        "2 of 3 rows of rank 0 (66.7%) are error rows, above --max-error-rate 0.1" in result.output
    )
    assert len(read_output(out)) == 3, "every row is committed"


def test_the_model_by_name_and_default(tmp_path: Path):
    src = write_lines(tmp_path / "in.jsonl", [chat("a", model=MODEL), chat("b")])
    out = tmp_path / "out"
    batch_run(src, out)
    rows = by_id(out)
    assert rows["a"]["error"] is None and rows["b"]["error"] is None
    assert (rows["a"]["model"], rows["b"]["model"]) == (MODEL, None)


# --- a repeated custom_id: refused, naming both lines ---------------------------------------


@pytest.mark.parametrize("buffer", [openai_batch._HashSpill.BUFFER, 3])
def test_a_repeated_custom_id_is_refused_naming_both_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, buffer: int
):
    monkeypatch.setattr(openai_batch._HashSpill, "BUFFER", buffer)  # 3: spilled partitions
    lines = [chat(f"r{i}") for i in range(10)]
    lines[7] = chat("r2")
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out"
    result = batch_run(src, out, expect=2)
    assert result.output.splitlines()[-1] == (
        f"Error: --openai-batch {src}: custom_id 'r2' is on line 3 and again on line 8 of "
        "in.jsonl; custom_ids must be unique (OpenAI refuses such a file too): give one of them "
        "another id"
    )
    assert not list(out.rglob("part-*"))


def test_unique_ids_pass_through_the_spill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(openai_batch._HashSpill, "BUFFER", 4)
    src = write_lines(tmp_path / "in.jsonl", [chat(f"r{i}") for i in range(50)])
    source = openai_batch.OpenAIBatchSource(str(src))
    assert source.total_rows == 50


def test_repeats_across_files_name_both_files(tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_lines(folder / "a.jsonl", [chat("x"), chat("y")])
    write_lines(folder / "b.jsonl", [chat("z"), chat("y")])
    result = batch_run(folder, tmp_path / "out", expect=2)
    assert "custom_id 'y' is on line 2 of a.jsonl and again on line 2 of b.jsonl" in result.output


# --- export ---------------------------------------------------------------------------------


def validate(line: dict) -> None:
    """One output line, checked with the openai package's own response types."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    assert set(line) == {"id", "custom_id", "response", "error"}
    response = line["response"]
    assert set(response) == {"status_code", "request_id", "body"}
    if response["status_code"] == 200:
        kind = ChatCompletion if response["body"]["object"] == "chat.completion" else Completion
        parsed = kind.model_validate(response["body"], strict=False)
        assert parsed.usage is not None
        assert (
            parsed.usage.total_tokens == parsed.usage.prompt_tokens + parsed.usage.completion_tokens
        )
    else:
        assert response["status_code"] == 400
        assert set(response["body"]["error"]) == {"message", "type", "param", "code"}


def test_export_writes_openai_batch_output(tmp_path: Path):
    lines = [
        chat("c1", temperature=0, max_tokens=4),
        completion("t1", n=2, temperature=0.8, seed=1, logprobs=2),
        chat("c2", logprobs=True, top_logprobs=2),
        chat("bad", tools=[]),
        "garbage",
        {
            "custom_id": "m1",
            "params": {
                "model": MODEL,
                "max_tokens": 3,
                "messages": [{"role": "user", "content": "Hi"}],
            },
        },
    ]
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out"
    batch_run(src, out, "--max-error-rate", "1", "--rows-per-shard", "2")
    results, errors = tmp_path / "results.jsonl", tmp_path / "errors.jsonl"
    result = run_cli("export", out, "--openai-batch", results)
    assert result.output == f"6 requests written to {results}: 4 succeeded, 2 failed\n"
    written = [json.loads(x) for x in results.read_text().splitlines()]
    for line in written:
        validate(line)
    assert [x["custom_id"] for x in written] == ["c1", "t1", "c2", "bad", None, "m1"]
    rows = read_output(out).to_pylist()
    t1 = written[1]["response"]["body"]
    assert [c["text"] for c in t1["choices"]] == [r["text"] for r in rows if r["id"] == "t1"]
    assert t1["usage"]["completion_tokens"] == sum(
        r["completion_tokens"] for r in rows if r["id"] == "t1"
    )
    assert len(t1["choices"][0]["logprobs"]["top_logprobs"][0]) == 2
    c2 = written[2]["response"]["body"]["choices"][0]
    assert len(c2["logprobs"]["content"][0]["top_logprobs"]) == 2
    assert written[4]["response"]["body"]["error"]["message"].startswith(
        "line 5 of in.jsonl: not JSON"
    )
    assert written[5]["response"]["body"]["object"] == "chat.completion"

    run_cli("export", out, "--openai-batch", results, "--errors", errors)
    assert [json.loads(x)["custom_id"] for x in results.read_text().splitlines()] == [
        "c1",
        "t1",
        "c2",
        "m1",
    ]
    assert [json.loads(x)["custom_id"] for x in errors.read_text().splitlines()] == ["bad", None]


def test_export_merges_overlapping_shards_in_input_order(tmp_path: Path):
    """Shards whose positions interleave (a slow request committed after later ones) come out
    in input order."""
    src = write_lines(tmp_path / "in.jsonl", [chat(f"r{i}") for i in range(12)])
    out = tmp_path / "out"
    batch_run(src, out, "--rows-per-shard", "12")
    (shard,) = (out / "rank-00000").glob("part-*.parquet")
    table = pq.read_table(shard)
    order = [[0, 1, 4, 9], [2, 3, 5, 11], [6, 7, 8, 10]]  # each shard sorted, shards overlapping
    shard.unlink()
    for seq, picks in enumerate(order):
        part = table.take(pa.array(picks)).replace_schema_metadata(table.schema.metadata)
        pq.write_table(part, out / "rank-00000" / f"part-00000-{seq:06d}.parquet")
    results = tmp_path / "results.jsonl"
    run_cli("export", out, "--openai-batch", results)
    assert [json.loads(x)["custom_id"] for x in results.read_text().splitlines()] == [
        f"r{i}" for i in range(12)
    ]


def test_export_says_what_is_not_committed_yet(tmp_path: Path):
    src = write_lines(tmp_path / "in.jsonl", [chat(f"r{i}") for i in range(6)])
    out = tmp_path / "out"
    batch_run(src, out, "--rows-per-shard", "2")
    sorted((out / "rank-00000").glob("part-*.parquet"))[
        1
    ].unlink()  # as if rows 2-3 were never committed
    result = run_cli("export", out, "--openai-batch", tmp_path / "r.jsonl")
    assert result.output.splitlines() == [
        f"4 requests written to {tmp_path / 'r.jsonl'}: 4 succeeded, 0 failed",
        "2 requests of the input are not committed yet (an unfinished run): rerun the same "
        "`batchgen run` to complete them, then export again",
    ]


def test_export_refuses_a_run_not_made_from_a_batch_file(tmp_path: Path):
    from conftest import run_args, write_prompts

    src = write_prompts(tmp_path / "in.parquet", ["a", "b"])
    out = tmp_path / "out"
    run_cli(*run_args(src, out, *FAKE_ENGINE))
    result = run_cli("export", out, "--openai-batch", tmp_path / "r.jsonl", expect=1)
    assert result.output == (
        f"Error: {out} was not made from a batch request file; export --openai-batch needs a run "
        "made with `batchgen run --openai-batch FILE`\n"
    )
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--prompt-column", "p"],
            "--prompt-column: with --openai-batch each line's body gives the prompt (messages: chat template; prompt: as is); drop them",
        ),
        (
            ["--id-column", "x"],
            "--id-column: with --openai-batch each line's custom_id is the row id; drop it",
        ),
        (
            ["--sampling-column", "s"],
            "--sampling-column: with --openai-batch each line's body gives its settings; drop it",
        ),
        (
            ["--parquet", "x.parquet"],
            "give exactly one input: --input PATH, --parquet PATH, --dataset NAME_OR_DIR or --openai-batch FILE.jsonl",
        ),
    ],
)
def test_flags_that_clash_with_a_batch_file(tmp_path: Path, flags, message):
    src = write_lines(tmp_path / "in.jsonl", [chat("a")])
    result = batch_run(src, tmp_path / "out", *flags, expect=2)
    assert result.output.splitlines()[-1] == f"Error: {message}"
