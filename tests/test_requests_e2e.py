"""Per-row requests on the real vLLM engine with the bundled model, each compared with raw
`vllm.LLM.generate` on the same token ids and SamplingParams built here, independently of
batchgen: a JSON-schema run, a choice run with logprobs, per-row settings; then a structured +
logprobs run killed part-way and resumed. All in-process runs share the session's engine."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import jsonschema
import pytest
from conftest import REAL_ENGINE, read_output, run_args, run_cli, write_prompts
from hooks import PAUSE_ENV
from test_kill_harness import Victim, wait_until

pytestmark = pytest.mark.engine

PROMPTS = [
    "I loved this film, the acting was wonderful.",
    "The food was cold and the waiter was rude.",
    "The meeting is at three o'clock on Tuesday.",
    "Best purchase I have made all year!",
]
SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["sentiment", "stars"],
    "additionalProperties": False,
}
CHOICES = ["positive", "negative", "neutral"]


@pytest.fixture(scope="module")
def raw():
    """The session's engine (REAL_ENGINE settings) and the test's own tokenization."""
    from transformers import AutoTokenizer

    from pipeline.config import EngineConfig
    from pipeline.engines import in_process_engine
    from pipeline.models import ensure_bundled_model

    model = str(ensure_bundled_model())
    engine = in_process_engine(EngineConfig(dtype="float32", max_model_len=512), model)
    tok = AutoTokenizer.from_pretrained(model)
    ids = []
    for p in PROMPTS:
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        ids.append(tok(text, add_special_tokens=False)["input_ids"])
    return engine.llm, ids


def raw_generate(llm, ids: list[list[int]], params: list) -> list:
    from vllm import SamplingParams  # noqa: F401  (params are built by the caller)

    return llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)


def rows(out: Path) -> list[dict]:
    table = read_output(out).sort_by([("id", "ascending"), ("sample_index", "ascending")])
    return table.to_pylist()


def run(tmp_path: Path, name: str, *flags: str, max_tokens: int = 32) -> list[dict]:
    src = write_prompts(tmp_path / "in.parquet", PROMPTS)
    out = tmp_path / name
    run_cli(*run_args(src, out, "--chat", *flags, *REAL_ENGINE, max_tokens=max_tokens))
    return rows(out)


def test_json_schema_run_equals_raw_vllm_and_finished_rows_validate(tmp_path, raw):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    llm, ids = raw
    schema_file = tmp_path / "review.schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    # xgrammar allows any whitespace between JSON tokens, and this small model uses a lot of it:
    # 96 tokens let most rows finish.
    ours = run(
        tmp_path, "out", "--json-schema", str(schema_file), "--temperature", "0", max_tokens=96
    )
    params = SamplingParams(
        temperature=0, max_tokens=96, structured_outputs=StructuredOutputsParams(json=SCHEMA)
    )
    theirs = raw_generate(llm, ids, [params] * len(ids))
    assert [r["text"] for r in ours] == [o.outputs[0].text for o in theirs]
    assert [r["completion_tokens"] for r in ours] == [len(o.outputs[0].token_ids) for o in theirs]
    assert [r["prompt_tokens"] for r in ours] == [len(i) for i in ids]
    finished = [r for r in ours if r["finish_reason"] == "stop"]
    assert finished, "no row finished within 96 tokens"
    for r in finished:
        jsonschema.validate(json.loads(r["text"]), SCHEMA)  # the test's own check
        assert r["parsed_ok"] is True
    assert all(r["parsed_ok"] is False for r in ours if r["finish_reason"] == "length")


def test_choice_run_with_logprobs_equals_raw_vllm(tmp_path, raw):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    llm, ids = raw
    flags = [a for c in CHOICES for a in ("--choice", c)]
    ours = run(tmp_path, "out", *flags, "--temperature", "0", "--logprobs", "3")
    params = SamplingParams(
        temperature=0,
        max_tokens=32,
        logprobs=3,
        structured_outputs=StructuredOutputsParams(choice=CHOICES),
    )
    theirs = raw_generate(llm, ids, [params] * len(ids))
    for r, o in zip(ours, theirs, strict=True):
        c = o.outputs[0]
        assert r["text"] == c.text and r["text"] in CHOICES and r["parsed_ok"] is True
        assert r["cumulative_logprob"] == pytest.approx(c.cumulative_logprob, abs=1e-4)
        assert [e["token_id"] for e in r["logprobs"]] == list(c.token_ids)
        for entry, token, position in zip(r["logprobs"], c.token_ids, c.logprobs, strict=True):
            assert entry["logprob"] == pytest.approx(position[token].logprob, abs=1e-4)
            top = sorted(position.items(), key=lambda kv: kv[1].rank)[:3]
            assert [t["token_id"] for t in entry["top"]] == [t for t, _ in top]
            assert [t["logprob"] for t in entry["top"]] == pytest.approx(
                [lp.logprob for _, lp in top], abs=1e-4
            )


def test_per_row_settings_equal_raw_vllm_with_each_rows_params(tmp_path, raw):
    from vllm import SamplingParams

    llm, ids = raw
    settings = [
        {"temperature": 0.0, "max_tokens": 12},
        {"temperature": 0.9, "top_p": 0.8, "seed": 1234, "n": 2, "max_tokens": 10},
        {"temperature": 0.0, "repetition_penalty": 1.3, "stop": ["."], "max_tokens": 20},
        {"temperature": 0.7, "top_k": 5, "seed": 99, "presence_penalty": 0.5},
    ]
    src = write_prompts(tmp_path / "in.parquet", PROMPTS, cfg=[json.dumps(s) for s in settings])
    out = tmp_path / "out"
    run_cli(*run_args(src, out, "--chat", "--sampling-column", "cfg", *REAL_ENGINE, max_tokens=8))
    ours = rows(out)
    params = [SamplingParams(**{"max_tokens": 8, **s}) for s in settings]
    theirs = raw_generate(llm, ids, params)
    expected = [
        (i, c.index, c.text, len(c.token_ids)) for i, o in enumerate(theirs) for c in o.outputs
    ]
    got = [
        (int(r["id"].split(":")[1]), r["sample_index"], r["text"], r["completion_tokens"])
        for r in ours
    ]
    assert got == expected
    assert json.loads(ours[1]["sampling"])["seed"] == 1234  # the row's own seed, recorded
    assert json.loads(ours[0]["sampling"])["max_tokens"] == 12


def test_a_regex_vllm_cannot_compile_is_refused_before_any_row(tmp_path, raw):
    src = write_prompts(tmp_path / "in.parquet", PROMPTS)
    out = tmp_path / "out"
    # Python's re accepts look-ahead; vLLM's grammar backends do not.
    result = run_cli(*run_args(src, out, "--regex", "a(?=b)", *REAL_ENGINE), expect=2)
    assert "Error: vLLM refuses the sampling settings: " in result.output
    assert "look-around" in result.output
    assert not list(out.glob("rank-*/part-*"))


@pytest.mark.other_engine  # --max-num-seqs 3
def test_structured_logprobs_run_killed_and_resumed_equals_an_uninterrupted_one(tmp_path):
    prompts = [f"Review {i}: {PROMPTS[i % 4]}" for i in range(12)]
    src = write_prompts(tmp_path / "in.parquet", prompts)
    flags = [a for c in CHOICES for a in ("--choice", c)]
    args = [
        *flags, "--logprobs", "2", "--temperature", "0", "--rows-per-shard", "3",
        "--max-num-seqs", "3", "--chat", *REAL_ENGINE,
    ]  # fmt: skip
    run_cli(*run_args(src, tmp_path / "reference", *args))
    reference = rows(tmp_path / "reference")
    out = tmp_path / "out"
    victim = Victim(run_args(src, out, *args), {PAUSE_ENV: "after_rename:2"})
    assert wait_until(victim.paused.is_set, victim, 600, "pause"), victim.stderr
    assert victim.kill() == -signal.SIGKILL
    assert 0 < len(rows(out)) < 12
    run_cli(*run_args(src, out, *args))
    assert rows(out) == reference  # every row once, texts, logprobs and parsed_ok equal
