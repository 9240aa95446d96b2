"""LoRA adapters and reasoning output on the real vLLM engine, with adapters written in the
test and the think-token fixture model (conftest.make_think_model): what they prove is the
plumbing (each row with its own adapter equals raw vLLM with that LoRARequest; thinking and
answer land in their columns with the right counts), not a model's quality.

Each test module here starts its own engine (LoRA-enabled; the fixture model with a reasoning
parser): they are kept to one run each."""

from __future__ import annotations

import pytest
from conftest import make_adapter, make_think_model, read_output, run_args, run_cli, write_prompts

pytestmark = [pytest.mark.engine, pytest.mark.other_engine]

PROMPTS = ["Name a fruit.", "What is the capital of Italy?", "Say hello.", "Count to three."]
ENGINE = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8"]


def chat_ids(model: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids = []
    for p in PROMPTS:
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        ids.append(tok(text, add_special_tokens=False)["input_ids"])
    return ids


def test_rows_with_two_adapters_and_the_base_each_equal_raw_vllm(tmp_path):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from pipeline.config import EngineConfig
    from pipeline.engines import in_process_engine
    from pipeline.models import ensure_bundled_model

    zero = make_adapter(tmp_path / "zero", zero_b=True, seed=1)
    tuned = make_adapter(tmp_path / "tuned", rank=16, targets=("q_proj", "v_proj"), seed=2)
    adapters = ["zero", "tuned", None, "tuned"]
    src = write_prompts(tmp_path / "in.parquet", PROMPTS, adapter=adapters)
    out = tmp_path / "out"
    args = run_args(
        src, out, "--chat", "--temperature", "0", *ENGINE,
        "--lora", f"zero={zero}", "--lora", f"tuned={tuned}", "--lora-column", "adapter",
        max_tokens=16,
    )  # fmt: skip
    run_cli(*args)
    ours = {r["id"]: r for r in read_output(out).to_pylist()}
    assert [ours[f"in.parquet:{i}"]["adapter"] for i in range(4)] == adapters

    # Raw vLLM on the same (LoRA-enabled) engine: the run's settings give the cached engine.
    model = str(ensure_bundled_model())
    loras = (("zero", str(zero.resolve())), ("tuned", str(tuned.resolve())))
    cfg = EngineConfig(dtype="float32", max_model_len=512, max_num_seqs=8, loras=loras)
    engine = in_process_engine(cfg, model)
    params = SamplingParams(temperature=0, max_tokens=16)
    ids = chat_ids(model)
    requests = {
        "zero": LoRARequest("zero", 1, str(zero)),
        "tuned": LoRARequest("tuned", 2, str(tuned)),
    }
    texts = {}
    for i, name in enumerate(adapters):
        out_i = engine.llm.generate(
            [{"prompt_token_ids": ids[i]}],
            params,
            lora_request=requests[name] if name else None,
            use_tqdm=False,
        )
        texts[i] = out_i[0].outputs[0].text
    base = engine.llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    for i in range(4):
        assert ours[f"in.parquet:{i}"]["text"] == texts[i], i
    # A zero-B adapter changes nothing; a trained one changes the text.
    assert ours["in.parquet:0"]["text"] == base[0].outputs[0].text
    assert ours["in.parquet:1"]["text"] != base[1].outputs[0].text


def test_thinking_and_answer_land_in_their_columns(tmp_path):
    model = make_think_model(tmp_path / "think-model")
    src = write_prompts(tmp_path / "in.parquet", PROMPTS)
    common = ["--model", str(model), "--chat", "--temperature", "0", "--reasoning-parser",
              "deepseek_r1", *ENGINE]  # fmt: skip
    # A thinking budget of 6 tokens: vLLM then ends the thinking, and the answer follows. The
    # template's newline after <think> is in the prompt and counts toward the budget.
    out = tmp_path / "budget"
    run_cli(*run_args(src, out, *common, "--thinking-token-budget", "6", max_tokens=24))
    rows = read_output(out).to_pylist()
    ended = [r for r in rows if r["reasoning_ended"]]
    assert ended, rows
    for r in ended:
        assert r["reasoning_tokens"] == 5 and r["reasoning"] is not None
        assert r["text"] is not None and "</think>" not in r["reasoning"]
        assert r["completion_tokens"] > 5 + 1  # thinking, the end marker, then the answer
    for r in rows:  # a model may also stop (end of sequence) before its thinking ends
        if not r["reasoning_ended"]:
            assert (r["finish_reason"], r["text"]) == ("stop", None), r
    # No budget and 4 tokens: cut off inside the thinking, flagged, never an empty answer.
    out = tmp_path / "cut"
    run_cli(*run_args(src, out, *common, max_tokens=4))
    rows = read_output(out).to_pylist()
    cut = [r for r in rows if r["finish_reason"] == "length"]
    assert cut, rows
    for r in cut:
        assert (r["text"], r["reasoning_ended"], r["reasoning_tokens"]) == (None, False, 4), r
        assert r["reasoning"]
