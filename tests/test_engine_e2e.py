"""End to end on the real vLLM engine (Transformers backend) with the bundled model.

All in-process tests share one engine (same REAL_ENGINE flags); the subprocess tests prove the
installed command, its exit codes and resume across processes.
"""

from __future__ import annotations

import functools
import json
import re
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    REAL_ENGINE,
    SAMPLE,
    greedy_sample_args,
    read_output,
    run_args,
    run_cli,
    run_cli_signalled,
    run_subprocess,
    write_prompts,
)

pytestmark = pytest.mark.engine

CHAT_PROMPTS = ["What is the capital of France?", "Name three primary colors."]
PLAIN_PROMPTS = ["The three primary colors are", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from pipeline.models import ensure_bundled_model

    return ensure_bundled_model()


@functools.cache
def transformers_model(model_dir: Path) -> tuple:
    """(tokenizer, float32 model) of Transformers itself, loaded once per session."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def transformers_greedy(
    model_dir: Path, prompts: list[str], chat: bool, max_new_tokens: int
) -> list[str]:
    """Transformers' own generate, float32, greedy: the reference batchgen must match."""
    import torch

    tok, model = transformers_model(Path(model_dir))
    texts = []
    for prompt in prompts:
        if chat:
            enc = tok.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
        else:
            enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        texts.append(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return texts


@pytest.mark.parametrize(
    "chat, prompts", [(True, CHAT_PROMPTS), (False, PLAIN_PROMPTS)], ids=["chat", "plain"]
)
def test_greedy_text_matches_transformers_generate(tmp_path, model_dir, chat, prompts):
    src = write_prompts(tmp_path / "in.parquet", prompts)
    out = tmp_path / "out"
    chat_flag = ["--chat"] if chat else []
    run_cli(*run_args(src, out, *chat_flag, "--temperature", "0", *REAL_ENGINE, max_tokens=16))
    got = read_output(out).sort_by("id").column("text").to_pylist()
    assert got == transformers_greedy(model_dir, prompts, chat, 16)
    if chat:
        assert got[0] == "The capital of France is Paris."


def test_parquet_sample_with_bad_rows_in_the_same_batch(tmp_path):
    """Empty, null and over-long prompts become error rows; the rest of the batch completes."""
    prompts = pq.read_table(SAMPLE).column("prompt").to_pylist()[:20]
    bad = {3: "", 7: None, 11: "word " * 2000}
    for i, value in bad.items():
        prompts[i] = value
    src = write_prompts(tmp_path / "mixed.parquet", prompts, n=list(range(20)))
    out = tmp_path / "out"
    result = run_cli(
        *run_args(
            src,
            out,
            "--chat",
            "--temperature",
            "0",
            "--keep-columns",
            "n",
            *REAL_ENGINE,
            max_tokens=12,
        )
    )
    assert "2 errors" in result.output
    rows = {r["n"]: r for r in read_output(out).to_pylist()}
    assert len(rows) == 20
    assert rows[7]["error"] == "column 'prompt' is null"
    assert (
        rows[11]["error"].startswith("the prompt is ")
        and "--max-model-len) is 512" in rows[11]["error"]
    )
    # An empty user message still renders the chat template, so it is a real (short) prompt.
    assert rows[3]["error"] is None and rows[3]["prompt_tokens"] > 0
    for n, row in rows.items():
        if n in (7, 11):
            assert row["text"] is None and row["finish_reason"] is None
        else:
            assert row["error"] is None and row["text"]
            assert row["finish_reason"] in ("stop", "length")
            assert 0 < row["completion_tokens"] <= 12


def test_plain_empty_prompt_is_an_error_row(tmp_path):
    src = write_prompts(tmp_path / "in.parquet", ["", "Hello"])
    out = tmp_path / "out"
    # One prompt of two is an error row: over the default --max-error-rate 0.1 (exit 1).
    run_cli(*run_args(src, out, "--temperature", "0", *REAL_ENGINE, max_tokens=4), expect=1)
    rows = read_output(out).sort_by("id").to_pylist()
    assert rows[0]["error"] == "the prompt is empty"
    assert rows[1]["error"] is None and rows[1]["completion_tokens"] == 4


def test_hf_dataset_folder_and_data_files(tmp_path):
    import datasets

    questions = ["What is 2 plus 2?", "Name a fruit.", "What color is grass?"]
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"q": questions, "qid": ["a", "b", "c"]}).save_to_disk(folder)
    out = tmp_path / "from_disk"
    run_cli(
        "run",
        "--dataset",
        folder,
        "--template",
        "Answer briefly: {q}",
        "--chat",
        "--id-column",
        "qid",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--output",
        out,
        *REAL_ENGINE,
    )
    from_disk = read_output(out).sort_by("id")
    assert from_disk.column("id").to_pylist() == ["a", "b", "c"]
    assert all(from_disk.column("text").to_pylist())

    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("".join(json.dumps({"q": q}) + "\n" for q in questions))
    out2 = tmp_path / "from_files"
    run_cli(
        "run",
        "--dataset",
        "json",
        "--data-files",
        jsonl,
        "--template",
        "Answer briefly: {q}",
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--output",
        out2,
        *REAL_ENGINE,
    )
    from_files = read_output(out2).sort_by("id")
    assert from_files.column("id").to_pylist() == ["train:0", "train:1", "train:2"]
    # Same prompts, same greedy engine: the same answers whichever reader produced them.
    assert from_files.column("text").to_pylist() == from_disk.column("text").to_pylist()


@pytest.mark.other_engine  # seed 8
def test_messages_column_and_samples_are_seeded_per_row(tmp_path):
    convs = [
        [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Favorite color?"},
        ],
        [{"role": "user", "content": "Tell me a fun fact."}],
        [{"role": "user", "content": "Name an animal."}],
    ]
    src = tmp_path / "msgs.parquet"
    pq.write_table(pa.table({"messages": convs}), src)

    def sample(out: Path, *extra: str) -> dict[tuple[str, int], str]:
        run_cli(
            "run",
            "--parquet",
            src,
            "--messages-column",
            "messages",
            "--n",
            "2",
            "--temperature",
            "1.0",
            "--max-tokens",
            "12",
            "--output",
            out,
            *REAL_ENGINE,
            *extra,
        )
        t = read_output(out)
        return {(r["id"], r["sample_index"]): r["text"] for r in t.to_pylist()}

    # The run seed is an engine setting: seed 0 (the default) shares the session's engine, and
    # only the run with another seed starts one.
    a = sample(tmp_path / "a", "--seed", "0")
    assert sorted(a) == [(f"msgs.parquet:{i}", s) for i in range(3) for s in (0, 1)]
    # One row per engine request and a shard per row: other batch neighbours, same texts.
    b = sample(tmp_path / "b", "--seed", "0", "--max-inflight", "1", "--rows-per-shard", "2")
    assert b == a
    c = sample(tmp_path / "c", "--seed", "8")
    assert c != a


def line_like(lines: list[str], start: str) -> str:
    """The one line that starts with `start` (its numbers vary with the machine)."""
    found = [line for line in lines if line.startswith(start)]
    assert len(found) == 1, lines
    return found[0]


def test_documented_command_then_sigterm_and_resume(tmp_path, greedy_reference):
    """The exact spelling the README promises, as a subprocess; then a stop and a resume."""
    out = tmp_path / "out"
    proc = run_subprocess(
        "run",
        "--parquet",
        SAMPLE,
        "--prompt-column",
        "prompt",
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        "16",
        "--output",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    # A quiet terminal: batchgen's lines only; vLLM's own log goes to a file beside the state.
    lines = [re.sub(r"\d+", "#", line) for line in proc.stderr.splitlines()]
    progress = [line for line in lines if line.startswith("batchgen: ")]
    assert progress and all(
        re.fullmatch(r"batchgen: #/# prompts \(#\.#%\) \| #(,#)? out tok/s( \| ETA [#ms]+)? \| "
                     r"elapsed [#ms]+", line) for line in progress
    ), progress  # fmt: skip
    log_file = out / ".batchgen" / "logs" / "engine-rank-00000.log"
    assert [line for line in lines if not line.startswith("batchgen: ")] == [
        re.sub(r"\d+", "#", f"00:00:00 batchgen: vLLM's own log: {log_file}"),
        "#:#:# batchgen: starting vLLM #.#.# (model_impl=transformers, enforce_eager=True)...",
        line_like(lines, "#:#:# batchgen: finished: # prompts this run (# rows, # errors) | "),
        re.sub(r"\d+", "#", f"00:00:00 batchgen: output: 48 prompts committed of 48 in 1 "
               f"shard(s) under {out}"),
    ]  # fmt: skip
    # vLLM's logger in this process writes its few later warnings to stdout (the engine's
    # start-up and its processes go to the log file); batchgen itself writes nothing there.
    assert "batchgen" not in proc.stdout
    engine_log = log_file.read_text()
    assert "Loading safetensors checkpoint shards" in engine_log and "EngineCore" in engine_log
    assert "finished: 48 prompts this run" in proc.stderr
    table = pq.read_table(out)  # pyarrow reads the folder as one table
    assert table.num_rows == 48
    first = table.filter(pa.compute.equal(table.column("id"), "prompts.parquet:0")).to_pylist()[0]
    assert first["text"] == "The capital of France is Paris."
    assert first["finish_reason"] == "stop"

    # Interrupt a run after its first commit; the rerun completes it exactly once, with the
    # texts of an uninterrupted run. float32: in bfloat16 a different batch mix can flip a
    # greedy token, which says nothing about resume. Both in this process, on the session's
    # engine: a fresh process's stop and resume on the real engine are test_first_hour_e2e's
    # Ctrl-C test and test_slurm's requeues (SIGINT, SIGUSR1; SIGTERM takes the same handler).
    resumed = tmp_path / "resumed"
    args = greedy_sample_args(resumed)
    stopped = run_cli_signalled(args, resumed, [signal.SIGTERM])
    assert stopped.exit_code == 75, stopped.output
    assert "SIGTERM received: finishing running requests" in stopped.output
    partial = read_output(resumed).num_rows
    assert 0 < partial < 48

    rerun = run_cli(*args)
    assert f"resuming rank 0: {partial} prompts already committed" in rerun.output
    final = read_output(resumed).sort_by("id")
    ids = final.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 48
    assert (
        final.column("text").to_pylist()
        == read_output(greedy_reference).sort_by("id").column("text").to_pylist()
    )
