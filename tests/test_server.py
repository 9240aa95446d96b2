"""`batchgen run --server` against a fake OpenAI-compatible server (tests/fake_openai.py): what is
sent, retries, backoff, Retry-After, refused rows, a server that goes away, the API key, and the
checks made before anything is written. No vLLM engine starts here."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from conftest import manifest_state, read_output, run_args, run_cli, write_prompts
from fake_openai import FakeOpenAI

from pipeline.models import ensure_bundled_model
from pipeline.sampling import row_seed

PROMPTS = [f"Tell me about the number {i}." for i in range(8)]
KEY = "sk-test-9f8e7d6c5b4a"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_bundled_model())


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_prompts(tmp_path / "in.parquet", PROMPTS)


def server_args(fake: FakeOpenAI, *extra: str) -> list[str]:
    """--server flags for `fake`, with the bundled tokenizer and quick retries."""
    return [
        "--server", fake.url, "--model", fake.model, "--tokenizer", str(ensure_bundled_model()),
        "--retry-backoff-seconds", "0.05", "--temperature", "0", *extra,
    ]  # fmt: skip


def decoder(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def by_id(out: Path) -> dict[str, dict]:
    """The first sample of each row, by id."""
    return {r["id"]: r for r in read_output(out).to_pylist() if r["sample_index"] == 0}


def manifest(out: Path) -> dict:
    return manifest_state(out)


def test_rows_go_as_token_ids_with_their_settings(tmp_path, src, tokenizer):
    budgets = [1, 2, 3, 4, 5, 6, 7, 8]
    src = write_prompts(tmp_path / "in.parquet", PROMPTS, budget=budgets)
    out = tmp_path / "out"
    with FakeOpenAI(decode=decoder(tokenizer)) as fake:
        flags = server_args(fake, "--max-tokens-column", "budget", "--n", "2", "--seed", "3")
        flags[flags.index("--temperature") + 1] = "0.7"
        run_cli(*run_args(src, out, *flags, "--top-k", "5"))
    sent = {e["key"]: e["body"] for e in fake.log if "body" in e}
    assert sorted(sent) == sorted(PROMPTS)
    rows = by_id(out)
    table = read_output(out).to_pylist()
    assert sorted((r["id"], r["sample_index"]) for r in table) == sorted(
        (f"in.parquet:{i}", s) for i in range(8) for s in (0, 1)
    )
    assert all(r["text"].endswith(f"#{r['sample_index']}") for r in table)
    for i, prompt in enumerate(PROMPTS):
        body = sent[prompt]
        ids = tokenizer(prompt)["input_ids"]
        seed = row_seed(3, f"in.parquet:{i}")
        assert body["prompt"] == ids  # exactly what batchgen tokenized
        assert (body["max_tokens"], body["n"], body["seed"]) == (budgets[i], 2, seed)
        assert (body["temperature"], body["top_k"], body["return_token_ids"]) == (0.7, 5, True)
        assert "min_p" not in body and "repetition_penalty" not in body  # neutral: not sent
        assert body["model"] == "fake-model"
    row = rows["in.parquet:1"]
    assert (
        row["text"]
        == f"ok {len(tokenizer(PROMPTS[1])['input_ids'])} tokens seed "
        + str(row_seed(3, "in.parquet:1"))
        + " #0"
    )
    assert (row["completion_tokens"], row["finish_reason"]) == (2, "length")
    assert rows["in.parquet:7"]["finish_reason"] == "stop"
    fp = manifest(out)["fingerprint"]
    assert fp["engine"] == "server"
    assert fp["server"]["model"] == "fake-model"
    assert fp["server"]["prompt_form"] == "token_ids"
    assert manifest(out)["report"]["engine"]["vllm"] == "0.32.0"


def test_transient_failures_are_retried_refused_rows_are_not(tmp_path, src, tokenizer):
    faults = {
        PROMPTS[0]: [("status", 429, {"Retry-After": "0"})],
        PROMPTS[1]: [("status", 503), ("status", 502)],
        PROMPTS[2]: [("drop",)],
        PROMPTS[3]: [("status", 400)],
        PROMPTS[4]: [("status", 500)] * 10,
        PROMPTS[5]: [("delay", 5.0)],
    }
    out = tmp_path / "out"
    with FakeOpenAI(decode=decoder(tokenizer), faults=faults) as fake:
        flags = server_args(fake, "--max-retries", "2", "--request-timeout", "2")
        result = run_cli(*run_args(src, out, *flags, "--max-error-rate", "0.5"))
    counts = {p: len(fake.requests_for(p)) for p in PROMPTS}
    assert counts == {
        PROMPTS[0]: 2, PROMPTS[1]: 3, PROMPTS[2]: 2, PROMPTS[3]: 1, PROMPTS[4]: 3,
        PROMPTS[5]: 2, PROMPTS[6]: 1, PROMPTS[7]: 1,
    }  # fmt: skip
    rows = by_id(out)
    assert len(rows) == 8
    errors = {k: r["error"] for k, r in rows.items() if r["error"]}
    assert errors == {
        "in.parquet:3": "the server refused this row: HTTP 400: injected 400 (not retried)",
        "in.parquet:4": "the server failed this row 3 times (--max-retries 2); last failure: "
        "HTTP 500: injected 500",
    }
    requests = manifest(out)["report"]["this_run"]["requests"]
    # On a loaded machine a request can also time out before this in-process server reads it:
    # such extra timeouts are retried like the injected one, and counted.
    timeouts = requests["retry_reasons"].pop("timeout")
    assert timeouts >= 1
    assert requests == {
        "requests": 14 + timeouts,
        "retries": 6 + timeouts,
        "retry_reasons": {
            "HTTP 429": 1, "HTTP 500": 2, "HTTP 502": 1, "HTTP 503": 1,
            "connection dropped by the server": 1,
        },
        "refused_rows": 1,
        "failed_rows": 1,
    }  # fmt: skip
    sent = f"{14 + timeouts} sent, {6 + timeouts} retried"
    assert f"server requests: {sent} (HTTP 429 1, HTTP 500 2, HTTP 502 1" in result.output
    status = run_cli("status", out)
    assert f"server requests in the last run: {sent}" in status.output


def test_retry_after_is_honoured_and_backoff_grows(tmp_path, src, tokenizer):
    faults = {
        PROMPTS[0]: [("status", 429, {"Retry-After": "1.5"})],
        PROMPTS[1]: [("status", 503)] * 3,
    }
    with FakeOpenAI(decode=decoder(tokenizer), faults=faults) as fake:
        flags = server_args(fake)
        flags[flags.index("--retry-backoff-seconds") + 1] = "0.4"
        run_cli(*run_args(src, tmp_path / "out", *flags))
    first = [e["at"] for e in fake.requests_for(PROMPTS[0])]
    assert 1.5 <= first[1] - first[0] < 6.0  # without Retry-After: 0.2-0.4 s
    times = [e["at"] for e in fake.requests_for(PROMPTS[1])]
    waits = [b - a for a, b in zip(times, times[1:], strict=False)]
    # 0.4, 0.8, 1.6 s, each jittered into its upper half (the slack is for a loaded machine)
    for wait, base in zip(waits, (0.4, 0.8, 1.6), strict=True):
        assert 0.5 * base - 0.05 <= wait <= base + 1.5


def test_a_server_that_goes_away_stops_the_run_with_75_and_a_rerun_finishes(
    tmp_path, src, tokenizer
):
    out = tmp_path / "out"
    with FakeOpenAI(decode=decoder(tokenizer), gone_after=3) as fake:
        flags = server_args(fake, "--server-fail-seconds", "2", "--max-retries", "1")
        args = run_args(src, out, *flags, "--max-inflight", "1", "--rows-per-shard", "1")
        started = time.monotonic()
        result = run_cli(*args, expect=75)
    assert time.monotonic() - started < 30
    assert "answered no request for" in result.output
    rows = by_id(out)
    assert len(rows) == 3 and not any(r["error"] for r in rows.values())  # no error rows
    status = run_cli("status", out, expect=3)
    assert "interrupted by batchgen itself (rerun to resume)" in status.output
    assert re.search(
        r"stopped because the server at http://127\.0\.0\.1:\d+/v1 answered no", status.output
    )
    # The server is back, on another port (the URL is not part of the run's settings).
    with FakeOpenAI(decode=decoder(tokenizer)) as fake:
        flags = server_args(fake, "--server-fail-seconds", "2", "--max-retries", "1")
        run_cli(*run_args(src, out, *flags, "--max-inflight", "1", "--rows-per-shard", "1"))
        assert len({e["key"] for e in fake.log if "key" in e}) == 5  # only the 5 not committed
    table = read_output(out)
    assert sorted(table.column("id").to_pylist()) == sorted(f"in.parquet:{i}" for i in range(8))


def test_the_api_key_goes_to_the_server_and_nowhere_else(
    tmp_path, src, tokenizer, monkeypatch, capfd
):
    monkeypatch.setenv("MY_KEY", KEY)
    out = tmp_path / "out"
    faults = {PROMPTS[0]: [("status", 400)], PROMPTS[1]: [("status", 503)]}
    with FakeOpenAI(decode=decoder(tokenizer), api_key=KEY, faults=faults) as fake:
        flags = server_args(fake, "--api-key-env", "MY_KEY")
        result = run_cli(*run_args(src, out, *flags, "--keep-prompt", "--max-error-rate", "0.5"))
        status = run_cli("status", out, "--json")
    assert {e["auth"] for e in fake.log} == {f"Bearer {KEY}"}
    captured = capfd.readouterr()
    for text in (result.output, status.output, captured.out, captured.err):
        assert KEY not in text
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 3
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("wrong model", "Error: --model other-model: the server at {url} does not serve it; it "
         "serves fake-model; pass --model with one of those"),
        ("unreachable", "Error: --server {url}: cannot reach the server (connection refused); "
         "start it (vllm serve MODEL --model-impl transformers --host HOST --port PORT) or fix "
         "the URL; nothing was written"),
        ("wrong key", "Error: --server {url}: the server refused the API key (HTTP 401 on GET "
         "/models); set $OPENAI_API_KEY to the key the server was started with"),
    ],
)  # fmt: skip
def test_server_problems_are_one_line_exit_1_and_nothing_written(
    tmp_path, src, tokenizer, monkeypatch, case, message
):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    out = tmp_path / "out"
    fake = FakeOpenAI(api_key=KEY if case == "wrong key" else None)
    url = fake.url
    model = "other-model" if case == "wrong model" else fake.model
    if case == "unreachable":
        fake.stop()
    try:
        flags = server_args(fake)
        flags[flags.index("--model") + 1] = model
        result = run_cli(*run_args(src, out, *flags), expect=1)
    finally:
        fake.stop()
    assert result.output.startswith(message.format(url=url))
    assert result.output.count("\n") == 1
    assert "sk-wrong" not in result.output
    assert not out.exists()


def test_a_resume_against_another_served_model_is_refused(tmp_path, src, tokenizer):
    out = tmp_path / "out"
    with FakeOpenAI(decode=decoder(tokenizer), gone_after=2) as fake:
        flags = server_args(fake, "--server-fail-seconds", "1", "--max-retries", "0")
        run_cli(
            *run_args(src, out, *flags, "--max-inflight", "1", "--rows-per-shard", "1"), expect=75
        )
    with FakeOpenAI("another-model", decode=decoder(tokenizer)) as fake:
        result = run_cli(*run_args(src, out, *server_args(fake)), expect=1)
        assert not [e for e in fake.log if "key" in e]  # no row was sent
    assert "holds an earlier run with different settings:" in result.output
    assert "  server.model: fake-model -> another-model\n" in result.output
    assert "  model: fake-model -> another-model\n" in result.output


def test_without_vllm_or_a_tokenizer_chat_rows_go_as_messages(tmp_path, src):
    out = tmp_path / "out"
    with FakeOpenAI(version=None, max_model_len=None) as fake:
        flags = [
            "--server",
            fake.url,
            "--temperature",
            "0",
            "--chat",
            "--system-prompt",
            "Be brief.",
        ]
        result = run_cli(*run_args(src, out, *flags, "--keep-prompt"))
    assert "no local tokenizer for fake-model" in result.output
    bodies = [e["body"] for e in fake.log if "body" in e]
    assert {e["path"] for e in fake.log if "body" in e} == {"/v1/chat/completions"}
    assert bodies[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert "return_token_ids" not in bodies[0]
    rows = by_id(out)
    assert rows["in.parquet:0"]["text"] == "ok 5 tokens #0"
    assert rows["in.parquet:0"]["prompt_tokens"] == 5  # the server's count (usage)
    assert rows["in.parquet:0"]["completion_tokens"] == 3
    assert manifest(out)["fingerprint"]["server"]["prompt_form"] == "chat"


def test_a_server_that_is_not_vllm_gets_text_and_refuses_logprobs(tmp_path, src, tokenizer):
    out = tmp_path / "out"
    with FakeOpenAI(version=None, decode=decoder(tokenizer)) as fake:
        run_cli(*run_args(src, out, *server_args(fake)))
        result = run_cli(
            *run_args(src, tmp_path / "out2", *server_args(fake), "--logprobs", "2"), expect=2
        )
    body = next(e["body"] for e in fake.log if "body" in e)
    assert body["prompt"] in PROMPTS and "return_token_ids" not in body
    assert manifest(out)["fingerprint"]["server"]["prompt_form"] == "text"
    assert "--logprobs/--prompt-logprobs with --server need a vLLM server" in result.output


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--server", "http://127.0.0.1:9/v1", "--dtype", "float32"],
         "Error: --dtype: engine settings of the in-process engine; with --server the server's "
         "own flags decide them"),
        (["--max-retries", "3"], "Error: --max-retries: only with --server URL"),
        (["--server", "ftp://x/v1"], "Error: --server 'ftp://x/v1': expected the server's base URL"),
        (["--server", "http://user:pw@host/v1"],
         "Error: --server: the URL carries credentials; give the URL without them"),
    ],
)  # fmt: skip
def test_flag_combinations_are_usage_errors(tmp_path, src, flags, message):
    result = run_cli(*run_args(src, tmp_path / "out", *flags), expect=2)
    assert message in result.output
    assert "pw" not in result.output.replace(message, "")


def test_logprobs_map_to_token_ids_and_the_tokenizers_text(tmp_path, src, tokenizer):
    out = tmp_path / "out"
    with FakeOpenAI(decode=decoder(tokenizer)) as fake:
        flags = server_args(fake, "--logprobs", "1", "--prompt-logprobs", "1")
        run_cli(*run_args(src, out, *flags))
    body = next(e["body"] for e in fake.log if "body" in e)
    assert (body["logprobs"], body["prompt_logprobs"]) == (1, 1)
    assert body["return_tokens_as_token_ids"] is True
    row = by_id(out)["in.parquet:0"]
    text = tokenizer.decode
    assert row["logprobs"] == [
        {
            "token_id": t,
            "token": text([t]),
            "logprob": -0.5,
            "top": [{"token_id": t + 100, "token": text([t + 100]), "logprob": -0.25}],
        }
        for t in range(3)
    ]
    assert row["cumulative_logprob"] == pytest.approx(-1.5)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    assert row["prompt_logprobs"][0] == {
        "token_id": ids[0],
        "token": None,
        "logprob": None,
        "top": [],
    }
    assert row["prompt_logprobs"][1:] == [
        {
            "token_id": t,
            "token": f"p{t}",
            "logprob": -1.0,
            "top": [{"token_id": 7, "token": "seven", "logprob": pytest.approx(-0.1)}],
        }
        for t in ids[1:]
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--memory", "--server", "http://127.0.0.1:9/v1"],
         "Error: --server: only for the throughput bench; drop --memory"),
        (["--server", "http://127.0.0.1:9/v1", "--with-transformers"],
         "Error: --with-transformers stops the engine; drop it with --server"),
    ],
)  # fmt: skip
def test_bench_server_flag_combinations(flags, message):
    assert message in run_cli("bench", *flags, expect=2).output


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("2", 2.0), ("0.5", 0.5), ("-3", 0.0), ("soon", None), (None, None)],
)
def test_retry_after_values(header, seconds):
    from pipeline.engines.http import retry_after

    assert retry_after(header) == seconds


def test_retry_after_as_an_http_date():
    import email.utils

    from pipeline.engines.http import retry_after

    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after(when) <= 30


def test_plan_of_a_server_run_sees_its_resume_and_counts_its_tokens(tmp_path, src, tokenizer):
    """`batchgen plan` with the run's --server flags asks the server as the run does, so its
    fingerprint is the run's (no refusal), and it counts what the run has still to send."""
    out = tmp_path / "out"
    with FakeOpenAI(decode=decoder(tokenizer), gone_after=3) as fake:
        flags = server_args(fake, "--server-fail-seconds", "2", "--max-retries", "1")
        run_cli(*run_args(src, out, *flags, "--max-inflight", "1", "--rows-per-shard", "1"),
                expect=75)  # fmt: skip
    with FakeOpenAI(decode=decoder(tokenizer), max_model_len=2048) as fake:
        args = run_args(src, out, *server_args(fake))
        result = run_cli("plan", *args[1:], "--json")
        assert not [e for e in fake.log if "body" in e]  # nothing generated
    plan = json.loads(result.stdout)
    assert plan["can_run"] and not plan["ranks"][0]["refused"]
    assert plan["all"]["committed_prompts"] == 3
    assert plan["all"]["todo"]["prompts"] == 5
    assert plan["all"]["todo"]["prompt_tokens"]["total"] == sum(
        len(tokenizer(p)["input_ids"]) for p in PROMPTS[3:]
    )
    assert plan["max_model_len"] == 2048 and "the server's" in plan["max_model_len_from"]
    with FakeOpenAI(decode=decoder(tokenizer)) as fake:
        result = run_cli("plan", *args[1:], "--calibrate", "5", expect=2)
    assert "--calibrate times the in-process engine" in result.output


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora", "a=/tmp/a"], "--lora: with --server the server holds the adapters"),
        (["--reasoning-parser", "qwen3"], "--reasoning-parser: batchgen sends token ids"),
        (["--batch-invariant"], "--batch-invariant: engine settings of the in-process engine"),
    ],
)
def test_in_process_only_features_are_refused_with_server(tmp_path, src, flags, message):
    args = run_args(src, tmp_path / "out", "--server", "http://127.0.0.1:9/v1", *flags)
    result = run_cli(*args, expect=2)
    assert message in result.output
    assert not (tmp_path / "out").exists()
