"""What a job reads before it touches its output: the model, this rank's input slice, the prompt
builder, the resolved sampling and the fingerprint. `batchgen run` and `batchgen plan` both start
here, so a plan renders and tokenizes exactly what the run would send."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.adapters import check_adapters
from pipeline.checkpoint import run_fingerprint
from pipeline.config import RunConfig
from pipeline.engines import preflight
from pipeline.models import generation_defaults, resolve_model
from pipeline.prompts import PromptBuilder, load_tokenizer
from pipeline.sources import Source, open_source, require_columns


@dataclass(slots=True)
class Job:
    """One rank's model, input, requests and fingerprint."""

    model: str
    source: Source
    builder: PromptBuilder
    sampling: dict[str, Any]
    fingerprint: dict[str, Any]


def read_job(cfg: RunConfig) -> Job:
    """Model, input, prompt builder, sampling and fingerprint; fails before any engine time.

    `batchgen tune` reads its sample through this too, so it times the requests a run sends.
    """
    model = resolve_model(cfg.engine.model)
    source = open_source(cfg.source, cfg.num_ranks, cfg.rank)
    sampling = cfg.sampling.resolve(generation_defaults(model))
    adapters = check_adapters(cfg.engine.loras, model) if cfg.engine.loras else []
    preflight(cfg.engine, model)
    builder = PromptBuilder(
        cfg.prompt,
        load_tokenizer(model, cfg.engine.trust_remote_code),
        cfg.output.keep_columns,
        cfg.sampling.max_tokens_column,
        sampling,
        cfg.engine.seed,
        adapters=tuple(a.name for a in adapters),
        lora_column=cfg.lora_column,
    )
    wanted = builder.columns()
    if cfg.source.id_column is not None:
        wanted[cfg.source.id_column] = "--id-column"
    require_columns(source, wanted)
    builder.check_types(source.field)
    fingerprint = run_fingerprint(
        cfg, model, source.identity(), builder.chat_template, sampling, adapters
    )
    return Job(model, source, builder, sampling, fingerprint)
