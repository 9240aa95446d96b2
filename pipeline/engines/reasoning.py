"""Reasoning models in the in-process engine: whether vLLM's reasoning parser fits the model,
and the split of each output into its thinking and its answer (`--reasoning-parser`). vLLM is
imported inside the functions, as in pipeline/engines/vllm.py."""

from __future__ import annotations

from typing import Any

from pipeline.records import ResultRow


def reasoning_problem(name: str, model: str) -> str | None:
    """Why vLLM's reasoning parser `name` cannot split this model's outputs, or None. Asked
    before the engine starts: vLLM itself would fail its start, or (for parsers that look for
    their markers as text) silently never find where thinking ends."""
    from vllm.reasoning import ReasoningParserManager

    names = sorted(ReasoningParserManager.list_registered())
    if name not in names:
        return f"--reasoning-parser {name!r}: vLLM has no such parser; its parsers are: {', '.join(names)}"
    tokenizer = _tokenizer(model)
    problem = _parser_problem(ReasoningParserManager.get_reasoning_parser(name), tokenizer)
    if problem is None:
        return None
    fits = [
        n
        for n in names
        if _parser_problem(ReasoningParserManager.get_reasoning_parser(n), tokenizer) is None
    ]
    return (
        f"--reasoning-parser {name}: {problem}, so this model does not think the way that "
        f"parser reads; drop --reasoning-parser for a model that does not think. Parsers whose "
        f"markers this model's tokenizer has: {', '.join(fits) or 'none'}"
    )


def _tokenizer(model: str) -> Any:
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(model)


def _parser_problem(cls: Any, tokenizer: Any) -> str | None:
    try:
        parser = cls(tokenizer)
    except Exception as exc:  # parsers raise RuntimeError or ValueError naming what is missing
        return f"the model's tokenizer lacks its think markers as tokens ({exc})"
    if getattr(parser, "end_token_id", None) is None and not getattr(
        parser, "reasoning_end_token_ids", None
    ):
        return "the model's tokenizer has no single token for where thinking ends"
    return None


class ReasoningSplit:
    """Splits a completion into its thinking and its answer by token ids, with vLLM's parser's
    markers: text before the end marker is reasoning, text after it the answer. A completion
    that never thinks (no marker, and the prompt did not open a thinking block) keeps all its
    text as the answer; one whose thinking never ended has no answer (text None,
    reasoning_ended False), whatever its finish reason."""

    def __init__(self, name: str, model: str) -> None:
        from vllm.reasoning import ReasoningParserManager

        self.tokenizer = _tokenizer(model)
        parser = ReasoningParserManager.get_reasoning_parser(name)(self.tokenizer)
        self.start = getattr(parser, "start_token_id", None)
        self.end = getattr(parser, "end_token_id", None)
        if self.end is None:  # parsers that read their markers as text (qwen3, glm45, ...)
            ends = getattr(parser, "reasoning_end_token_ids", None) or ()
            self.end = next(iter(ends), None)
        if self.start is None:
            start = getattr(parser, "reasoning_start_str", None)
            self.start = self.tokenizer.get_vocab().get(start) if start else None

    def split(self, result: ResultRow, prompt_ids: list[int], ids: list[int]) -> None:
        opened = self.start is not None and self._open(prompt_ids)
        if not opened and self.start not in ids and self.end not in ids:
            result.reasoning, result.reasoning_tokens, result.reasoning_ended = None, 0, None
            return
        if self.end in ids:
            cut = ids.index(self.end)
            thought, answer = ids[:cut], ids[cut + 1 :]
            result.text = self._decode(answer)
            result.reasoning_ended = True
        else:
            thought = ids
            result.text = None
            result.reasoning_ended = False
        thought = [t for t in thought if t != self.start]
        result.reasoning = self._decode(thought)
        result.reasoning_tokens = len(thought)

    def _open(self, prompt_ids: list[int]) -> bool:
        """Whether the prompt ends inside a thinking block (its template opened one)."""
        for token in reversed(prompt_ids):
            if token == self.end:
                return False
            if token == self.start:
                return True
        return False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
