"""An instant stand-in for vLLM, for I/O, crash and scale tests and for `batchgen bench`'s
I/O-path figure. It runs the same admission loop as the real engine; its "text" is a digest of
the prompt tokens (and, when sampling, of the row's seed and sample index), so outputs are
deterministic and a resumed run can be compared row for row with an uninterrupted one.

BATCHGEN_FAKE_STEP_SECONDS (default 0) makes each step take that long, so tests can land a
signal or a kill in the middle of a run.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from pipeline import __version__
from pipeline.config import EngineConfig, row_seed
from pipeline.engine import RejectedPrompt, StopFlags, admission_loop
from pipeline.records import PromptRow, ResultRow

FAKE_MAX_MODEL_LEN = 2048


class _Completion:
    __slots__ = ("index", "text", "finish_reason", "token_ids")

    def __init__(self, index: int, text: str, finish_reason: str, n_tokens: int) -> None:
        self.index, self.text, self.finish_reason = index, text, finish_reason
        self.token_ids = range(n_tokens)


class _Output:
    __slots__ = ("prompt_token_ids", "outputs")

    def __init__(self, prompt_token_ids: list[int], outputs: list[_Completion]) -> None:
        self.prompt_token_ids, self.outputs = prompt_token_ids, outputs


class FakeEngine:
    """Answers every request in the next step; `max_num_seqs` requests per step."""

    def __init__(self, cfg: EngineConfig, model: str) -> None:
        self.cfg = cfg
        self.model = model
        self.max_model_len = cfg.max_model_len or FAKE_MAX_MODEL_LEN
        self.max_num_seqs = cfg.max_num_seqs or 256
        self.step_seconds = float(os.environ.get("BATCHGEN_FAKE_STEP_SECONDS", "0"))
        self.start_seconds = 0.0
        self._counter = 0

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "fake",
            "model": self.model,
            "model_impl": self.cfg.model_impl,
            "dtype": self.cfg.dtype,
            "max_model_len": self.max_model_len,
            "vllm": None,
            "transformers": None,
            "batchgen": __version__,
        }

    def generate(
        self,
        rows: Iterable[PromptRow | None],
        sampling: dict[str, Any],
        seed: int,
        flags: StopFlags,
        max_inflight: int | None = None,
    ) -> Iterator[list[ResultRow]]:
        queue: deque[tuple[str, PromptRow]] = deque()
        n, max_tokens = sampling["n"], sampling["max_tokens"]
        sampled = sampling["temperature"] > 0

        def add(row: PromptRow) -> str:
            if len(row.token_ids) >= self.max_model_len:
                raise RejectedPrompt(f"prompt of {len(row.token_ids)} tokens is too long")
            self._counter += 1
            request_id = str(self._counter)
            queue.append((request_id, row))
            return request_id

        def answer(row: PromptRow) -> _Output:
            base = hashlib.blake2b(repr(row.token_ids).encode(), digest_size=6).hexdigest()
            completions = []
            budget = row.max_tokens or max_tokens
            for i in range(n):
                salt = f" s{row_seed(seed, row.id) % 100_000}.{i}" if sampled else ""
                n_tokens = min(budget, 8)
                finish = "length" if n_tokens == budget else "stop"
                completions.append(_Completion(i, f"fake {base}{salt}", finish, n_tokens))
            return _Output(row.token_ids, completions)

        def step() -> list[tuple[str, _Output]]:
            if self.step_seconds:
                time.sleep(self.step_seconds)
            done = []
            for _ in range(min(self.max_num_seqs, len(queue))):
                request_id, row = queue.popleft()
                done.append((request_id, answer(row)))
            return done

        def abort(request_ids: list[str]) -> None:
            dropped = set(request_ids)
            for item in [q for q in queue if q[0] in dropped]:
                queue.remove(item)

        inflight = max_inflight or 4 * self.max_num_seqs
        yield from admission_loop(rows, n, inflight, flags, add, step, abort, self.max_num_seqs)
