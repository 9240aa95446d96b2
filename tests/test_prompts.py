"""PromptBuilder on the bundled model's tokenizer: token-exact prompts, chat rendering, row errors.

The bundled SmolLM2 tokenizer adds no special tokens to plain text, so a doubled BOS could not
show with it alone; every token test also runs on the same tokenizer made to add its BOS
(`<|im_start|>`), the way Llama-style tokenizers do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import PromptConfig
from pipeline.models import ensure_bundled_model
from pipeline.prompts import PromptBuilder, load_tokenizer
from pipeline.records import PromptRow

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def bundled_tokenizer():
    return load_tokenizer(str(ensure_bundled_model()))


@pytest.fixture(scope="module")
def bos_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ensure_bundled_model()), add_bos_token=True)
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # or the BOS tests prove nothing
    return tok


@pytest.fixture(params=["bundled", "adds-bos"])
def tokenizer(request: pytest.FixtureRequest):
    name = "bundled_tokenizer" if request.param == "bundled" else "bos_tokenizer"
    return request.getfixturevalue(name)


def build(
    tokenizer: Any,
    columns: dict[str, list[Any]],
    max_model_len: int | None = None,
    keep: tuple[str, ...] = (),
    **cfg: Any,
) -> list[PromptRow]:
    builder = PromptBuilder(PromptConfig(**cfg), tokenizer, keep)
    builder.max_model_len = max_model_len
    n = len(next(iter(columns.values())))
    seqs = [10 + 2 * i for i in range(n)]
    rows = builder.build([f"r{i}" for i in range(n)], columns, seqs)
    assert [(r.id, r.seq) for r in rows] == list(
        zip([f"r{i}" for i in range(n)], seqs, strict=True)
    )
    return rows


def chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


TEXTS = ["Hello world", "Write one sentence about the number 7.", "naïve café — ok?"]


def test_plain_prompt_tokens_include_the_tokenizers_special_tokens(tokenizer: Any) -> None:
    rows = build(tokenizer, {"prompt": TEXTS}, prompt_column="prompt")
    for row, text in zip(rows, TEXTS, strict=True):
        assert row.error is None
        assert row.messages is None
        assert (row.prompt, row.prompt_text) == (text, text)
        assert row.token_ids == tokenizer(text)["input_ids"]
    if tokenizer.add_bos_token:
        assert all(r.token_ids[0] == tokenizer.bos_token_id for r in rows)


def test_chat_prompt_is_the_models_template_without_a_doubled_bos(tokenizer: Any) -> None:
    bos = tokenizer.bos_token_id
    rows = build(tokenizer, {"prompt": TEXTS}, prompt_column="prompt", chat=True)
    for row, text in zip(rows, TEXTS, strict=True):
        assert row.error is None
        assert row.messages == [{"role": "user", "content": text}]
        assert row.prompt == text
        assert row.prompt_text == chat_text(tokenizer, [{"role": "user", "content": text}])
        assert row.prompt_text == (
            f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        )
        assert row.token_ids == tokenizer(row.prompt_text, add_special_tokens=False)["input_ids"]
        assert row.token_ids[0] == bos  # the template's own <|im_start|>
        assert row.token_ids[:2] != [bos, bos]


def test_system_prompt_is_prepended_to_a_chat_prompt(tokenizer: Any) -> None:
    rows = build(
        tokenizer, {"prompt": ["Hi"]}, prompt_column="prompt", chat=True, system_prompt="Be brief."
    )
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert rows[0].prompt_text == chat_text(tokenizer, expected)
    assert rows[0].prompt_text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert DEFAULT_SYSTEM not in rows[0].prompt_text
    assert (
        rows[0].token_ids == tokenizer(rows[0].prompt_text, add_special_tokens=False)["input_ids"]
    )


def test_system_prompt_defers_to_a_rows_own_system_message(bundled_tokenizer: Any) -> None:
    own = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    bare = [{"role": "user", "content": "Hi"}]
    rows = build(
        bundled_tokenizer,
        {"messages": [own, bare]},
        messages_column="messages",
        system_prompt="Be brief.",
    )
    assert rows[0].prompt_text == chat_text(bundled_tokenizer, own)
    assert "Be brief." not in rows[0].prompt_text
    assert rows[1].prompt_text == chat_text(
        bundled_tokenizer, [{"role": "system", "content": "Be brief."}, *bare]
    )


def test_json_string_messages_are_accepted(bundled_tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye", "name": "ignored extra key"},
    ]
    rows = build(
        bundled_tokenizer,
        {"messages": [json.dumps(messages), messages]},
        messages_column="messages",
    )
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    for row in rows:
        assert row.error is None
        assert row.messages == clean
        assert row.prompt_text == chat_text(bundled_tokenizer, clean)
        assert (
            row.token_ids
            == bundled_tokenizer(row.prompt_text, add_special_tokens=False)["input_ids"]
        )


def test_template_fills_columns(tokenizer: Any) -> None:
    rows = build(
        tokenizer,
        {"title": ["Cats", "Dogs"], "body": ["purr", "bark"], "unused": [1, 2]},
        template="Summarize {title}: {body} ({title})",
    )
    assert [r.prompt for r in rows] == [
        "Summarize Cats: purr (Cats)",
        "Summarize Dogs: bark (Dogs)",
    ]
    assert [r.prompt_text for r in rows] == [r.prompt for r in rows]
    assert [r.token_ids for r in rows] == tokenizer([r.prompt for r in rows])["input_ids"]


def test_keep_columns_pass_through_on_good_and_error_rows(bundled_tokenizer: Any) -> None:
    rows = build(
        bundled_tokenizer,
        {"prompt": ["ok", None], "topic": ["t0", "t1"], "score": [0.5, None]},
        keep=("topic", "score"),
        prompt_column="prompt",
    )
    assert [r.passthrough for r in rows] == [
        {"topic": "t0", "score": 0.5},
        {"topic": "t1", "score": None},
    ]
    assert [r.error for r in rows] == [None, "column 'prompt' is null"]


BAD_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('role bad is not "
    "allowed') }}{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

# (config, the bad value, the row's exact error)
ROW_ERRORS = [
    pytest.param({"prompt_column": "p"}, None, "column 'p' is null", id="null-prompt"),
    pytest.param({"prompt_column": "p"}, 42, "column 'p' holds int, not text", id="int-prompt"),
    pytest.param(
        {"prompt_column": "p"}, ["a", "b"], "column 'p' holds list, not text", id="list-prompt"
    ),
    pytest.param(
        {"prompt_column": "p", "chat": True}, None, "column 'p' is null", id="null-chat-prompt"
    ),
    pytest.param({"prompt_column": "p"}, "", "the prompt is empty", id="empty-prompt"),
    pytest.param(
        {"template": "Q: {p} ({q})"}, None, "--template column(s) 'p' null", id="null-template"
    ),
    pytest.param({"messages_column": "p"}, None, "column 'p' is null", id="null-messages"),
    pytest.param(
        {"messages_column": "p"},
        {"role": "user", "content": "hi"},
        "column 'p' must be a non-empty list of {role, content} messages",
        id="messages-not-a-list",
    ),
    pytest.param(
        {"messages_column": "p"},
        [],
        "column 'p' must be a non-empty list of {role, content} messages",
        id="messages-empty-list",
    ),
    pytest.param(
        {"messages_column": "p"},
        [{"content": "hi"}],
        "column 'p': message 0 has no 'role'",
        id="message-missing-role",
    ),
    pytest.param(
        {"messages_column": "p"},
        [{"role": "user", "content": "hi"}, "hello"],
        "column 'p': message 1 has no 'role'",
        id="message-not-a-dict",
    ),
    pytest.param(
        {"messages_column": "p"},
        [{"role": "user", "content": None}],
        "column 'p': message 0 has no text 'content'",
        id="message-null-content",
    ),
    pytest.param(
        {"messages_column": "p"},
        "hello there",
        "column 'p' is text but not JSON messages (Expecting value: line 1 column 1 (char 0))",
        id="messages-text-not-json",
    ),
    pytest.param(
        {"messages_column": "p"},
        '"just a string"',
        "column 'p' must be a non-empty list of {role, content} messages",
        id="messages-json-not-a-list",
    ),
    pytest.param(
        {"messages_column": "p", "chat_template": "BAD_TEMPLATE"},
        [{"role": "bad", "content": "hi"}],
        "the chat template failed on this row: role bad is not allowed",
        id="chat-template-raises",
    ),
]


@pytest.mark.parametrize(("cfg", "bad", "error"), ROW_ERRORS)
def test_a_bad_row_becomes_that_rows_error(
    bundled_tokenizer: Any, tmp_path: Path, cfg: dict[str, Any], bad: Any, error: str
) -> None:
    if cfg.get("chat_template") == "BAD_TEMPLATE":
        (tmp_path / "t.jinja").write_text(BAD_TEMPLATE)
        cfg = {**cfg, "chat_template": str(tmp_path / "t.jinja")}
    good = [{"role": "user", "content": "fine"}] if "messages_column" in cfg else "fine"
    columns = {"p": [good, bad, good], "q": ["x", "x", "x"]}
    rows = build(bundled_tokenizer, columns, **cfg)  # must not raise
    assert [r.error for r in rows] == [None, error, None]
    # Neighbours are untouched; the good rows are tokenized.
    assert rows[0].token_ids == rows[2].token_ids
    assert rows[0].token_ids
    # A row rejected while rendering is never tokenized.
    assert rows[1].token_ids is None


def test_empty_prompt_is_an_error_with_a_bos_adding_tokenizer(bos_tokenizer: Any) -> None:
    rows = build(bos_tokenizer, {"prompt": ["", "fine"]}, prompt_column="prompt")
    assert rows[0].error == "the prompt is empty"
    assert rows[0].token_ids is None
    assert rows[1].error is None


@pytest.mark.parametrize("chat", [False, True])
def test_over_long_prompt_becomes_an_error_at_the_context_limit(tokenizer: Any, chat: bool):
    text = "Write one sentence about the number 7."
    probe = build(tokenizer, {"prompt": [text]}, prompt_column="prompt", chat=chat)[0]
    n = len(probe.token_ids)
    assert n > 2
    # n tokens fit a context of n + 1 (one output token); a context of n holds no output.
    fits = build(tokenizer, {"prompt": [text]}, n + 1, prompt_column="prompt", chat=chat)[0]
    assert fits.error is None
    rows = build(tokenizer, {"prompt": [text, "Hi"]}, n, prompt_column="prompt", chat=chat)
    assert rows[0].error == (
        f"the prompt is {n} tokens; the model's context (--max-model-len) is {n}, which must "
        "hold the prompt and at least one output token"
    )
    assert rows[0].token_ids == probe.token_ids  # kept: the error row reports prompt_tokens
    assert rows[1].error is None
