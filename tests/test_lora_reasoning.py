"""LoRA adapters and reasoning output without an engine run: adapters checked against the base
model before any engine time (naming the file), each row's adapter (--lora-column) kept across
a kill and a resume, --chat-template-kwarg reaching the template and the run's settings, and
the thinking/answer split on recorded token sequences. On the real engine:
tests/test_lora_reasoning_e2e.py."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from conftest import (
    FAKE_ENGINE,
    HOOKED_BATCHGEN,  # noqa: F401  (Victim runs it)
    make_adapter,
    make_think_model,
    manifest_state,
    read_output,
    run_args,
    run_cli,
    write_prompts,
)
from hooks import PAUSE_ENV
from test_kill_harness import Victim, wait_until


@pytest.fixture
def src(tmp_path: Path) -> Path:
    names = ["a", "b", None, "a", "b", None] * 10
    return write_prompts(
        tmp_path / "in.parquet", [f"Question {i}?" for i in range(60)], 10, adapter=names
    )


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(base / "a", seed=1),
        "b": make_adapter(base / "b", rank=16, targets=("q_proj", "k_proj", "v_proj"), seed=2),
        "wrong-shape": make_adapter(base / "wrong", seed=3),
        "bad-module": make_adapter(base / "bad-module", seed=4),
    }


def lora_args(src: Path, out: Path, adapters: dict[str, Path], *extra: str) -> list[str]:
    return run_args(
        src,
        out,
        *FAKE_ENGINE,
        "--lora",
        f"a={adapters['a']}",
        "--lora",
        f"b={adapters['b']}",
        "--lora-column",
        "adapter",
        "--rows-per-shard",
        "6",
        "--max-num-seqs",
        "4",
        *extra,
    )


def test_each_row_runs_with_its_adapter_and_the_column_records_it(src, tmp_path, adapters):
    out = tmp_path / "out"
    run_cli(*lora_args(src, out, adapters))
    rows = read_output(out).sort_by("id").to_pylist()
    for r in rows:
        i = int(r["id"].split(":")[1])
        want = ["a", "b", None][i % 3]
        assert r["adapter"] == want
        assert r["text"].endswith(f" [{want}]") if want else "[" not in r["text"]


def test_unknown_adapter_in_a_row_is_that_rows_error(tmp_path, adapters):
    src = write_prompts(tmp_path / "in.parquet", ["x", "y", "z"], adapter=["a", "c", None])
    out = tmp_path / "out"
    run_cli(*lora_args(src, out, adapters, "--max-error-rate", "1"))
    errors = read_output(out).sort_by("id").column("error").to_pylist()
    assert errors == [
        None,
        "--lora-column 'adapter' names adapter 'c', which no --lora gives; the adapters are: "
        "a, b (a null row runs the base model)",
        None,
    ]


def test_adapters_are_checked_against_the_base_model_before_any_engine_time(
    src, tmp_path, adapters
):
    import torch
    from safetensors.torch import load_file, save_file

    wrong = adapters["wrong-shape"] / "adapter_model.safetensors"
    tensors = load_file(str(wrong))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(8, 100)
    save_file(tensors, str(wrong))
    bad_module = adapters["bad-module"] / "adapter_model.safetensors"
    tensors = load_file(str(bad_module))
    tensors["base_model.model.model.layers.0.self_attn.foo_proj.lora_A.weight"] = torch.zeros(
        8, 576
    )
    save_file(tensors, str(bad_module))
    missing = tmp_path / "missing"
    missing.mkdir()
    cases = {
        "wrong-shape": f"--lora x={adapters['wrong-shape']}: {wrong} tensor {key} has shape "
        "[8, 100], but rank 8 on this base model needs [8, 576]; the adapter was trained for "
        "another model",
        "bad-module": f"--lora x={adapters['bad-module']}: {bad_module} adapts 'foo_proj', which "
        "the base model has no such layer for; its adaptable modules are: down_proj, gate_proj, "
        "k_proj, o_proj, q_proj, up_proj, v_proj",
        "missing": f"--lora x={missing}: {missing / 'adapter_config.json'} is missing; a PEFT "
        "adapter folder holds adapter_config.json and adapter_model.safetensors",
    }
    for name, message in cases.items():
        folder = missing if name == "missing" else adapters[name]
        out = tmp_path / f"out-{name}"
        args = run_args(src, out, *FAKE_ENGINE, "--lora", f"x={folder}")
        result = run_cli(*args, expect=2)
        assert result.output.splitlines()[-1] == f"Error: {message}", name
        assert not list(out.glob("rank-*/part-*"))


def test_several_adapters_need_a_column(src, tmp_path, adapters):
    args = run_args(
        src,
        tmp_path / "out",
        *FAKE_ENGINE,
        "--lora",
        f"a={adapters['a']}",
        "--lora",
        f"b={adapters['b']}",
    )
    assert run_cli(*args, expect=2).output.splitlines()[-1] == (
        "Error: --lora a, b: with several adapters, name each row's adapter with --lora-column "
        "COL (one adapter alone applies to every row)"
    )


def test_a_changed_adapter_file_is_refused_on_resume(src, tmp_path, adapters):
    out = tmp_path / "out"
    adapter = make_adapter(tmp_path / "mine", seed=9)
    args = run_args(src, out, *FAKE_ENGINE, "--lora", f"mine={adapter}")
    run_cli(*args)
    make_adapter(adapter, seed=10)  # retrained in place
    result = run_cli(*args, expect=1)
    assert "\n  adapters.mine: " in result.output, result.output


def test_killed_and_resumed_rows_keep_their_adapters(src, tmp_path, adapters):
    run_cli(*lora_args(src, tmp_path / "reference", adapters))
    reference = read_output(tmp_path / "reference").sort_by("id").to_pylist()
    out = tmp_path / "out"
    victim = Victim(
        lora_args(src, out, adapters),
        {PAUSE_ENV: "after_rename:2", "BATCHGEN_FAKE_STEP_SECONDS": "0.05"},
    )
    assert wait_until(victim.paused.is_set, victim, 240, "pause"), victim.stderr
    assert victim.kill() == -signal.SIGKILL
    assert 0 < read_output(out).num_rows < 60
    run_cli(*lora_args(src, out, adapters))
    assert read_output(out).sort_by("id").to_pylist() == reference


def test_chat_template_kwargs_reach_the_template_and_the_settings(tmp_path):
    model = make_think_model(tmp_path / "think-model")
    src = write_prompts(tmp_path / "in.parquet", ["What is 2 + 2?"])
    out = tmp_path / "out"
    base = ["--model", str(model), "--chat", "--keep-prompt", *FAKE_ENGINE]
    run_cli(*run_args(src, out, *base))
    assert read_output(out).column("prompt")[0].as_py().endswith("<|im_start|>assistant\n<think>\n")
    off = tmp_path / "off"
    run_cli(*run_args(src, off, *base, "--chat-template-kwarg", "enable_thinking=false"))
    assert read_output(off).column("prompt")[0].as_py().endswith("<|im_start|>assistant\n")
    meta = manifest_state(off)
    assert meta["fingerprint"]["prompt"]["chat_template_kwargs"] == {"enable_thinking": False}
    result = run_cli(
        *run_args(src, off, *base, "--chat-template-kwarg", "enable_thinking=true"), expect=1
    )
    assert "\n  prompt.chat_template_kwargs.enable_thinking: false -> true\n" in result.output


def test_a_reasoning_parser_for_a_model_without_think_tokens_is_refused_before_the_engine(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", ["hi"])
    out = tmp_path / "out"
    result = run_cli(*run_args(src, out, "--chat", "--reasoning-parser", "deepseek_r1"), expect=2)
    last = result.output.splitlines()[-1]
    assert last.startswith(
        "Error: --reasoning-parser deepseek_r1: the model's tokenizer lacks its think markers as "
        "tokens (DeepSeekR1ReasoningParser reasoning parser could not locate think start/end "
        "tokens in the tokenizer!), so this model does not think the way that parser reads; "
        "drop --reasoning-parser for a model that does not think. Parsers whose markers this "
        "model's tokenizer has: "
    ), last
    assert not out.exists() or not list(out.glob("rank-*/part-*"))
    result = run_cli(*run_args(src, out, "--chat", "--reasoning-parser", "nope"), expect=2)
    assert "Error: --reasoning-parser 'nope': vLLM has no such parser; its parsers are: " in (
        result.output
    )


@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
def test_the_split_on_recorded_token_sequences(tmp_path, parser):
    from pipeline.engines.reasoning import ReasoningSplit
    from pipeline.records import ResultRow

    model = make_think_model(tmp_path / "think-model")
    split = ReasoningSplit(parser, str(model))
    tok = split.tokenizer
    think, end = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    words = tok.encode("two plus two", add_special_tokens=False)
    answer = tok.encode("It is 4.", add_special_tokens=False)
    opened_prompt = [1, 520, think]  # the template opened the block
    plain_prompt = [1, 520]

    def run(prompt: list[int], ids: list[int]) -> tuple:
        r = ResultRow(id="x", seq=0, sample_index=0, text="raw", finish_reason="stop",
                      prompt_tokens=len(prompt), completion_tokens=len(ids))  # fmt: skip
        split.split(r, prompt, ids)
        return r.reasoning, r.text, r.reasoning_tokens, r.reasoning_ended

    assert run(plain_prompt, [think, *words, end, *answer]) == (
        "two plus two",
        "It is 4.",
        len(words),
        True,
    )
    # the prompt opened the block: no start marker in the output
    assert run(opened_prompt, [*words, end, *answer]) == (
        "two plus two",
        "It is 4.",
        len(words),
        True,
    )
    # end tag only, prompt did not open a block: still thinking until the end tag
    assert run(plain_prompt, [*words, end, *answer])[3] is True
    # cut off inside the thinking: no answer at all, flagged
    assert run(opened_prompt, words) == ("two plus two", None, len(words), False)
    # no thinking at all: the whole text is the answer
    assert run(plain_prompt, answer) == (None, "raw", 0, None)


def test_batch_invariant_mode_is_refused_on_a_cpu_naming_the_exact_alternative(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", ["hi"])
    result = run_cli(*run_args(src, tmp_path / "out", "--batch-invariant"), expect=2)
    assert result.output.splitlines()[-1] == (
        "Error: --batch-invariant needs a GPU: vLLM's batch-invariant kernels exist for CUDA, "
        "ROCm and XPU only; on this CPU use --dtype float32, whose greedy outputs are already "
        "the same whatever the batch, so a resumed run equals an uninterrupted one"
    )
