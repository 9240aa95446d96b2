"""A batch request file on the real engine (bundled model, float32): `batchgen run --openai-batch`
then `batchgen export`, compared line for line with `vllm run-batch` on the same file (same
custom_ids in the same order, same greedy texts, equal usage counts), every line validated with
the `openai` package's own types. vLLM 0.32's run-batch serves /v1/chat/completions only, so the
completions lines are compared with raw `LLM.generate` on token ids and SamplingParams built here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REAL_ENGINE, run_cli
from test_openai_batch import chat, completion, validate, write_lines

pytestmark = pytest.mark.engine

MODEL = "SmolLM2-135M-Instruct"
CHAT_LINES = [
    chat(
        "q1", model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}]
    ),
    chat(
        "q2",
        model=MODEL,
        messages=[
            {"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
    ),
    chat(
        "q3", model=MODEL, messages=[{"role": "user", "content": "List three fruits."}], stop=["\n"]
    ),
    chat(
        "q4",
        model=MODEL,
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Write a haiku about rain."}]}
        ],
        max_completion_tokens=12,
    ),
]
COMPLETION_PROMPTS = ["The quick brown fox", "Once upon a time, in a small village,"]


def greedy(line: dict) -> dict:
    line["body"].setdefault("temperature", 0)
    line["body"].setdefault("max_tokens", 24)
    return line


@pytest.fixture(scope="module")
def model_dir() -> str:
    from pipeline.models import ensure_bundled_model

    return str(ensure_bundled_model())


def run_batch(src: Path, dst: Path, model: str) -> int:
    """vLLM's own batch runner on the same file, in a process of its own; its exit status."""
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.run_batch",
        *("-i", str(src), "-o", str(dst), "--model", model),
        *("--served-model-name", MODEL, "--model-impl", "transformers"),
        *("--dtype", "float32", "--max-model-len", "512", "--enforce-eager"),
    ]
    with open(dst.with_suffix(".log"), "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=420)
    return done.returncode


def test_batch_file_equals_vllm_run_batch(tmp_path: Path, model_dir: str):
    chat_file = write_lines(tmp_path / "chat.jsonl", [greedy(x) for x in CHAT_LINES])
    reference = tmp_path / "run_batch.jsonl"
    # One engine at a time: two at once do not fit this machine's memory.
    code = run_batch(chat_file, reference, model_dir)
    assert code == 0, reference.with_suffix(".log").read_text()[-3000:]
    lines = [greedy(dict(x)) for x in CHAT_LINES]
    lines += [greedy(completion(f"t{i}", prompt=p)) for i, p in enumerate(COMPLETION_PROMPTS)]
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out"
    run_cli("run", "--openai-batch", src, "--output", out, *REAL_ENGINE)
    results = tmp_path / "results.jsonl"
    run_cli("export", out, "--openai-batch", results)
    ours = [json.loads(x) for x in results.read_text().splitlines()]
    for line in ours:
        validate(line)
        assert line["response"]["status_code"] == 200
    theirs = [json.loads(x) for x in reference.read_text().splitlines()]
    assert [x["custom_id"] for x in ours[: len(theirs)]] == [x["custom_id"] for x in theirs]
    for mine, ref in zip(ours, theirs, strict=False):
        a, b = mine["response"]["body"], ref["response"]["body"]
        assert a["object"] == b["object"] == "chat.completion"
        assert a["model"] == b["model"] == MODEL
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
        assert a["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"]
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert a["usage"][key] == b["usage"][key], (mine["custom_id"], key)
    compare_completions(ours[len(theirs) :], model_dir)


def compare_completions(lines: list[dict], model_dir: str) -> None:
    """The text_completion lines against raw LLM.generate on the prompts tokenized here."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from pipeline.config import EngineConfig
    from pipeline.engines import in_process_engine

    llm = in_process_engine(EngineConfig(dtype="float32", max_model_len=512), model_dir).llm
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [tok(p)["input_ids"] for p in COMPLETION_PROMPTS]
    outputs = llm.generate(
        [{"prompt_token_ids": i} for i in ids],
        SamplingParams(temperature=0, max_tokens=24),
        use_tqdm=False,
    )
    assert [x["custom_id"] for x in lines] == ["t0", "t1"]
    for line, ref, prompt_ids in zip(lines, outputs, ids, strict=True):
        body = line["response"]["body"]
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == ref.outputs[0].text
        assert body["usage"]["prompt_tokens"] == len(prompt_ids)
        assert body["usage"]["completion_tokens"] == len(ref.outputs[0].token_ids)
