"""The config fingerprint: every setting that changes what a row's output is, and the words
that name what changed when a resume's settings differ."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.adapters import Adapter
from pipeline.config import RunConfig
from pipeline.models import model_signature
from pipeline.sources.listing import listing_digest

# Fingerprint fields that name the rank rather than the run; every other field must agree
# across all ranks writing one output folder.
RANK_FIELDS = ("shard_index",)


def run_fingerprint(
    cfg: RunConfig,
    model: str,
    input_identity: dict[str, Any],
    chat_template: str | None,
    sampling: dict[str, Any],
    adapters: list[Adapter] = (),
    server: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every setting that changes what a row's output is. A resume must match it exactly.

    The keys are stored in manifests and shards; renaming one makes every earlier run
    unresumable, so they keep their first spelling (`num_shards` is the rank count). A --server
    run adds `server` (the served model, the prompt form and the tokenizer: see
    ServerEngine.settings); the server decides model_impl, dtype and context, so those are null.
    """
    in_process = server is None
    fingerprint = {
        "model": model,
        "model_files": model_signature(model),
        "model_impl": cfg.engine.model_impl if in_process else None,
        "dtype": cfg.engine.dtype if in_process else None,
        "max_model_len": cfg.engine.max_model_len,
        "engine": cfg.engine.backend if in_process else "server",
        "prompt": {
            "prompt_column": cfg.prompt.prompt_column,
            "template": cfg.prompt.template,
            "messages_column": cfg.prompt.messages_column,
            "chat": cfg.prompt.chat,
            "system_prompt": cfg.prompt.system_prompt,
        },
        "chat_template_sha256": hashlib.sha256(chat_template.encode()).hexdigest()[:16]
        if chat_template
        else None,
        "sampling": sampling,
        "seed": cfg.engine.seed,
        "input": input_identity,
        "id_column": cfg.source.id_column,
        "columns": {
            "keep_prompt": cfg.output.keep_prompt,
            "keep_columns": list(cfg.output.keep_columns),
        },
        "num_shards": cfg.num_ranks,
        "shard_index": cfg.rank,
    }
    fingerprint.update(_when_used(cfg, adapters))
    if server is not None:
        fingerprint["server"] = server
    if cfg.prompt.chat_template_kwargs:
        fingerprint["prompt"]["chat_template_kwargs"] = dict(cfg.prompt.chat_template_kwargs)
    if cfg.output.format != "parquet":  # each shard's JSONL: a resume cannot leave some out
        fingerprint["columns"]["format"] = cfg.output.format
    return fingerprint


def _when_used(cfg: RunConfig, adapters: list[Adapter]) -> dict[str, Any]:
    """The settings recorded only when used, so the fingerprints of runs that never used them
    are unchanged."""
    extra: dict[str, Any] = {}
    if adapters:
        extra["adapters"] = {a.name: a.sha256 for a in adapters}
        extra["lora_column"] = cfg.lora_column
    if cfg.engine.reasoning_parser:
        extra["reasoning_parser"] = cfg.engine.reasoning_parser
    if cfg.engine.batch_invariant:
        extra["batch_invariant"] = True
    # Speculative decoding changes what is sampled for a given seed (greedy texts only up to
    # floating-point effects): a resume must keep it, unlike the engine's batch limits.
    speculative = dict(cfg.engine.engine_args).get("speculative_config")
    if speculative is not None:
        extra["speculative_config"] = speculative
    # So does quantizing the weights (e.g. "fp8"): other logits, other texts.
    quantization = dict(cfg.engine.engine_args).get("quantization")
    if quantization is not None:
        extra["quantization"] = quantization
    return extra


def diff_fingerprints(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable `field: old -> new` lines for every setting that differs."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(key, _ABSENT), flat_new.get(key, _ABSENT)
        if a != b:
            lines.append(f"{key}: {_short(a)} -> {_short(b)}")
    return lines


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True) if isinstance(v, list) else v
    return out


_ABSENT = object()


def _short(value: Any, limit: int = 120) -> str:
    if value is _ABSENT or value is None:
        return "(not set)"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shared_fingerprint(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint less its rank fields: what every rank of one run shares."""
    return {k: v for k, v in fingerprint.items() if k not in RANK_FIELDS}


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """A fixed-size reference to a fingerprint (what a shard carries instead of a copy)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:32]


def for_rank(fingerprint: dict[str, Any], rank: int) -> dict[str, Any]:
    """The fingerprint of another rank of the same run."""
    return {**fingerprint, "shard_index": rank}


def current_form(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint as this batchgen writes it. Before the input listing (resume format 3 as
    first released), the fingerprint held the input's whole file list, [name, size, rows,
    digest] per file; it now holds that list's digest and counts (pipeline/sources/listing.py),
    so an output folder of that batchgen compares equal and resumes."""
    ident = fingerprint.get("input")
    if not (isinstance(ident, dict) and isinstance(ident.get("files"), list)):
        return fingerprint
    if ident.get("kind") not in ("parquet", "openai_batch"):
        return fingerprint
    files = ident["files"]
    listed = {
        "kind": ident["kind"],
        "spec": ident.get("spec"),
        "files": len(files),
        "rows": sum(f[2] for f in files),
        "listing_sha256": listing_digest(files),
    }
    return {**fingerprint, "input": listed}
