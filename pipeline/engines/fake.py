"""An instant stand-in for vLLM, for I/O, crash and scale tests and for `batchgen bench`'s
I/O-path figure. It runs the same admission loop as the real engine; its "text" is a digest of
the prompt tokens (and, when sampling, of the row's seed and sample index), so outputs are
deterministic and a resumed run can be compared row for row with an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Any

from pipeline.config import EngineConfig
from pipeline.engines.base import RejectedPrompt, SteppingEngine
from pipeline.records import PromptRow, ResultRow
from pipeline.version import __version__

FAKE_MAX_MODEL_LEN = 2048
FAKE_COMPLETION_TOKENS = 8  # every fake sample is this long, or its budget if shorter


class FakeEngine(SteppingEngine):
    """Answers every queued request in the next step; `max_num_seqs` requests per step."""

    def __init__(self, cfg: EngineConfig, model: str) -> None:
        self.cfg = cfg
        self.model = model
        self.max_model_len = cfg.max_model_len or FAKE_MAX_MODEL_LEN
        self.max_num_seqs = cfg.max_num_seqs or 256
        self.start_seconds = 0.0
        self._queue: deque[tuple[str, PromptRow]] = deque()
        self._counter = 0
        self.requests_accepted = 0  # requests taken, over the engine's life
        self.failures: list[dict[str, Any]] = []

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

    def tunables(self) -> dict[str, Any]:
        """vLLM's CPU defaults, so `batchgen tune --engine fake` walks the search it walks on a
        CPU machine (the fake itself ignores every engine argument)."""
        return {
            "device": "cpu",
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": 4096,
            "enable_chunked_prefill": True,
            "enable_prefix_caching": True,
            "speculative_config": None,
            "gpu_memory_utilization": None,
            "max_cudagraph_capture_size": None,
            "quantization": None,
        }

    def reset_prefix_cache(self) -> None:
        """Nothing is cached."""

    def kv_cache_tokens(self) -> int | None:
        """No KV cache."""
        return None

    def close(self) -> None:
        self._queue.clear()

    def _restart(self) -> None:
        self._queue.clear()

    def _add(self, row: PromptRow) -> str:
        assert row.token_ids is not None
        if len(row.token_ids) >= self.max_model_len:
            raise RejectedPrompt(f"prompt of {len(row.token_ids)} tokens is too long")
        self._counter += 1
        self.requests_accepted += 1
        request_id = str(self._counter)
        self._queue.append((request_id, row))
        return request_id

    def _step(self) -> list[tuple[str, Any]]:
        done = []
        for _ in range(min(self.max_num_seqs, len(self._queue))):
            request_id, row = self._queue.popleft()
            done.append((request_id, None))
        return done

    def _abort(self, request_ids: list[str]) -> None:
        dropped = set(request_ids)
        self._queue = deque(q for q in self._queue if q[0] not in dropped)

    def _results(self, row: PromptRow, output: Any) -> list[ResultRow]:
        assert row.token_ids is not None
        base = hashlib.blake2b(repr(row.token_ids).encode(), digest_size=6).hexdigest()
        budget = row.max_tokens or row.sampling["max_tokens"]
        n_tokens = min(budget, FAKE_COMPLETION_TOKENS)
        finish = "length" if n_tokens == budget else "stop"
        k = row.sampling.get("logprobs")
        results = []
        for i in range(row.n):
            salt = f" s{row.seed % 100_000}.{i}" if row.seed is not None else ""
            adapter = f" [{row.adapter}]" if row.adapter else ""  # each adapter answers its own
            text = f"fake {base}{salt}{adapter}"
            choices = row.sampling.get("choice")
            if choices:  # a constrained answer is one of the choices
                text = choices[int(base, 16) % len(choices)]
            logprobs = None if k is None else _fake_logprobs(base, n_tokens, k)
            results.append(
                ResultRow.of(
                    row,
                    i,
                    text=text,
                    finish_reason=finish,
                    prompt_tokens=len(row.token_ids),
                    completion_tokens=n_tokens,
                    logprobs=logprobs,
                    cumulative_logprob=None if logprobs is None else sum(e[2] for e in logprobs),
                    prompt_logprobs=_fake_prompt_logprobs(row, row.sampling.get("prompt_logprobs")),
                )
            )
        return results


def _fake_logprobs(base: str, n_tokens: int, k: int) -> list:
    """Deterministic stand-in logprobs: token i is id i, with alternatives i+1..i+k."""
    seed = int(base[:4], 16)
    return [
        (
            seed + i,
            f"t{seed + i}",
            -0.5 - i / 10,
            [(seed + i + j, f"t{seed + i + j}", -1.0 - j) for j in range(k)],
        )
        for i in range(n_tokens)
    ]


def _fake_prompt_logprobs(row: PromptRow, k: int | None) -> list | None:
    if k is None:
        return None
    assert row.token_ids is not None
    return [
        (t, f"t{t}", None if i == 0 else -0.25, [] if i == 0 else [(t, f"t{t}", -0.25)][:k])
        for i, t in enumerate(row.token_ids)
    ]
