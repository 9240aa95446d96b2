"""--group-prefixes: rows read a window ahead and admitted in the order of their prompt tokens,
so prompts that share a document run together (pipeline/admission.py). Fake engine: it answers
in admission order, so with a shard every 4 rows each shard holds the rows admitted together."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import (
    FAKE_ENGINE,
    REAL_ENGINE,
    manifest_state,
    read_output,
    run_args,
    run_cli,
    write_prompts,
)

from pipeline.admission import grouped
from pipeline.bench.workload import make_prompts
from pipeline.records import PromptRow

DOCS, QUESTIONS = 5, 4


def _row(seq: int, tokens: list[int] | None, adapter: str | None = None) -> PromptRow:
    return PromptRow(id=str(seq), seq=seq, token_ids=tokens, adapter=adapter)


def test_each_window_goes_in_token_order_every_row_once_in_chunks() -> None:
    rows = [_row(0, [5, 1]), _row(1, [3, 9]), _row(2, None), _row(3, [5, 0]), _row(4, [1])]
    rows += [_row(5, [2], "a"), _row(6, [1], "a")]
    out = list(grouped([rows[:3], rows[3:]], window=4, chunk=3))
    assert [[r.seq for r in chunk] for chunk in out] == [[2, 1, 3], [0], [4, 6, 5]]


def _shuffled_questions(tmp_path: Path) -> tuple[Path, dict[int, int]]:
    """DOCS documents of ~60 words, QUESTIONS questions each, the rows shuffled; each row's doc."""
    rng = random.Random(7)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
    ]
    docs = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(DOCS)]
    pairs = [(d, q) for d in range(DOCS) for q in range(QUESTIONS)]
    rng.shuffle(pairs)
    prompts = [f"Document: {docs[d]}\n\nQuestion {q}: what does it say?" for d, q in pairs]
    return write_prompts(tmp_path / "in.parquet", prompts), {i: d for i, (d, _) in enumerate(pairs)}


def _docs_per_shard(out: Path, doc_of: dict[int, int]) -> list[set[int]]:
    shards = manifest_state(out)["shards"]
    return [{doc_of[p] for lo, hi in s["positions"] for p in range(lo, hi)} for s in shards]


def test_rows_sharing_a_document_are_admitted_together_and_written_once(tmp_path: Path) -> None:
    src, doc_of = _shuffled_questions(tmp_path)
    base = ("--rows-per-shard", str(QUESTIONS), "--max-num-seqs", str(QUESTIONS))
    run_cli(*run_args(src, tmp_path / "plain", *FAKE_ENGINE, *base))
    run_cli(*run_args(src, tmp_path / "grouped", *FAKE_ENGINE, *base, "--group-prefixes", "20"))
    # Input order: the shuffled documents mix in every shard; grouped: one document a shard.
    assert any(len(docs) > 1 for docs in _docs_per_shard(tmp_path / "plain", doc_of))
    assert all(len(docs) == 1 for docs in _docs_per_shard(tmp_path / "grouped", doc_of))
    plain, grouped_out = (read_output(tmp_path / n).sort_by("id") for n in ("plain", "grouped"))
    assert grouped_out.num_rows == DOCS * QUESTIONS == len(set(grouped_out["id"].to_pylist()))
    assert grouped_out["text"].to_pylist() == plain["text"].to_pylist()


def test_a_negative_window_is_refused_naming_the_fix(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "in.parquet", ["a"])
    result = run_cli(
        *run_args(src, tmp_path / "out", *FAKE_ENGINE, "--group-prefixes", "-1"), expect=2
    )
    assert result.output.endswith(
        "Error: --group-prefixes -1: give a window of rows (e.g. 4096), or 0 for input order\n"
    ), result.output


@pytest.mark.engine
def test_grouped_admission_on_the_real_engine_gives_raw_vllms_greedy_texts(tmp_path: Path) -> None:
    """Order changes which rows share a step, never a row's output: in float32 every row's
    greedy text equals raw `LLM.generate` on the test's own token ids, in input order; and the
    run counts the prompt tokens vLLM's prefix cache served."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from pipeline.config import EngineConfig
    from pipeline.engines import in_process_engine
    from pipeline.models import ensure_bundled_model

    # Two documents of ~300 tokens, three questions each, interleaved in the input.
    docs = [" ".join(["The Nile flows north to the sea."] * 40), " ".join(["Bees dance."] * 80)]
    prompts = [f"{docs[d]} Question {q}: what is this about?" for q in (1, 2, 3) for d in (0, 1)]
    src = write_prompts(tmp_path / "in.parquet", prompts)
    out = tmp_path / "out"
    # One request in the engine at a time, so each question after its document's first finds
    # the document cached (rows in one engine step compute their prefixes side by side).
    flags = ("--chat", "--temperature", "0", "--group-prefixes", "6", "--max-inflight", "1")
    run_cli(*run_args(src, out, *flags, *REAL_ENGINE, max_tokens=16))
    ours = read_output(out).sort_by("id")["text"].to_pylist()
    this_run = manifest_state(out)["report"]["this_run"]
    # vLLM's count of prompt tokens its prefix cache served: at least most of each document for
    # the 4 later questions (whole cache blocks only), never more than the prompts hold.
    assert 4 * 200 <= this_run["prompt_tokens_cached"] < this_run["prompt_tokens"]
    model = str(ensure_bundled_model())
    llm = in_process_engine(EngineConfig(dtype="float32", max_model_len=512), model).llm
    tok = AutoTokenizer.from_pretrained(model)
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    theirs = llm.generate(
        [{"prompt_token_ids": i} for i in ids],
        SamplingParams(temperature=0, max_tokens=16),
        use_tqdm=False,
    )
    assert ours == [o.outputs[0].text for o in theirs]


def test_the_bench_workload_shares_each_document_among_its_questions_shuffled_apart() -> None:
    texts, budgets = make_prompts(40, 50, 80, 4, 8, seed=3, questions=4)
    documents = [t.rsplit("\n\nQuestion ", 1)[0] for t in texts]
    assert len(texts) == len(budgets) == 40 and len(set(texts)) == 40
    assert sorted(documents.count(d) for d in set(documents)) == [4] * 10
    assert documents[:4] != [documents[0]] * 4  # shuffled: a document's questions lie apart
    assert make_prompts(40, 50, 80, 4, 8, seed=3, questions=4) == (texts, budgets)
