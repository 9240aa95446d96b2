"""Request keys: a 16-byte digest of everything that decides a row's output.

A key covers the run's output-changing settings (the model's file signature, as the run's
fingerprint records it, the engine, dtype, context, adapters, reasoning parser, speculative
decoding, batch invariance, a server's identity) and the row's own request: its prompt token
ids (the rendered prompt text or messages where no tokenizer counted them), its sampling
parameters (per-row settings included), its budget, its seed, its LoRA adapter and its
structured-output constraint. Two rows with one key send the engine the identical request.
Settings that only name things (the input, the id column, kept columns, rank counts) and the
run's own seed (it enters through each sampled row's seed) are left out, so a grown dataset or
a reshaped job still matches.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Iterable
from typing import Any

from pipeline import structured
from pipeline.records import PromptRow
from pipeline.sampling import engine_params

KEY_BYTES = 16  # 128 bits: no collision to expect below 10^18 rows
# The fingerprint fields (pipeline.checkpoint.run_fingerprint) that change what a request
# returns; everything else in the fingerprint is reached through the row's own request.
CONTEXT_FIELDS = (
    "model_files",
    "model_impl",
    "dtype",
    "max_model_len",
    "engine",
    "adapters",
    "reasoning_parser",
    "batch_invariant",
    "speculative_config",
    "server",
)


def output_context(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The output-changing settings of a run, from its fingerprint."""
    return {k: fingerprint.get(k) for k in CONTEXT_FIELDS}


def folder_settings(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What must agree for a --reuse folder to hold any of this run's requests: the output
    context, plus the run-wide prompt form and sampling (and the run seed when it samples), which
    reach every row. With --sampling-column rows carry their own settings, so the run's sampling
    may differ and single rows still match."""
    settings = output_context(fingerprint)
    prompt = fingerprint.get("prompt") or {}
    settings["prompt"] = {k: v for k, v in prompt.items() if not k.endswith("_column")}
    settings["chat_template_sha256"] = fingerprint.get("chat_template_sha256")
    sampling = fingerprint.get("sampling") or {}
    if "sampling_column" not in sampling:
        settings["sampling"] = sampling
        if sampling.get("temperature", 0) > 0:
            settings["seed"] = fingerprint.get("seed")
    return settings


def context_difference(ours: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """The first output-changing setting that differs, as `field: theirs -> ours`, or None."""
    from pipeline.checkpoint import diff_fingerprints

    lines = diff_fingerprints(theirs, ours)
    return lines[0] if lines else None


class RequestKeys:
    """Stamps each row's `request_key`; one per run (the run's output context is fixed)."""

    def __init__(self, fingerprint: dict[str, Any]) -> None:
        context = json.dumps(output_context(fingerprint), sort_keys=True, default=str)
        self.context_digest = hashlib.blake2b(context.encode(), digest_size=16).digest()
        # Sampling records are shared by every row without overrides: encode each record once.
        self._sampling: dict[int, tuple[dict[str, Any], bytes]] = {}

    def stamp(self, rows: Iterable[PromptRow]) -> None:
        """Set `request_key` on every row that has a request (error rows keep None)."""
        for row in rows:
            row.request_key = None if row.error is not None else self.key(row)

    def key(self, row: PromptRow) -> bytes:
        """The row's request key (see the module docstring)."""
        h = hashlib.blake2b(self.context_digest, digest_size=KEY_BYTES)
        h.update(self._encoded_sampling(row.sampling))
        h.update(json.dumps([row.max_tokens, row.seed, row.adapter]).encode())
        if row.token_ids is not None:
            h.update(b"t")
            h.update(array("q", row.token_ids).tobytes())
        elif row.messages is not None:  # a server renders it: the messages are the request
            h.update(b"m" + json.dumps(row.messages, sort_keys=True).encode())
        else:
            h.update(b"p" + (row.prompt_text or row.prompt or "").encode())
        return h.digest()

    def _encoded_sampling(self, sampling: dict[str, Any]) -> bytes:
        cached = self._sampling.get(id(sampling))
        if cached is not None and cached[0] is sampling:
            return cached[1]
        request = {"params": engine_params(sampling), "constraint": structured.constraint(sampling)}
        encoded = json.dumps(request, sort_keys=True, default=str).encode()
        if len(self._sampling) > 64:  # per-row records come and go: keep the cache small
            self._sampling.clear()
        self._sampling[id(sampling)] = (sampling, encoded)
        return encoded
