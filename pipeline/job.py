"""What a job reads before it touches its output: the model, this rank's input slice, the prompt
builder, the resolved sampling and the fingerprint. `batchgen run` and `batchgen plan` both start
here, so a plan renders and tokenizes exactly what the run would send."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.adapters import check_adapters
from pipeline.config import RunConfig
from pipeline.engines import preflight
from pipeline.fingerprint import run_fingerprint
from pipeline.models import generation_defaults, resolve_model
from pipeline.prompts import PromptBuilder, load_tokenizer
from pipeline.rankstate import STATE_DIR
from pipeline.sources import ListingStore, Source, open_source, require_columns
from pipeline.storage import is_url

if TYPE_CHECKING:
    from pipeline.engines.server import ServerEngine


@dataclass(slots=True)
class Job:
    """One rank's model, input, requests and fingerprint."""

    model: str
    source: Source
    builder: PromptBuilder
    sampling: dict[str, Any]
    fingerprint: dict[str, Any]


def read_job(cfg: RunConfig, server: ServerEngine | None = None, save_listing: bool = False) -> Job:
    """Model, input, prompt builder, sampling and fingerprint; fails before any engine time.
    With a server, the model is the served one and the tokenizer the one it found. The input's
    listing is the one kept in --output when it matches the input (a run, `save_listing`,
    makes and keeps it there when none does; pipeline/sources/listing.py).

    `batchgen tune` reads its sample through this too, so it times the requests a run sends.
    """
    if server is None:
        model = resolve_model(cfg.engine.model)
        tokenizer = load_tokenizer(model, cfg.engine.trust_remote_code)
        defaults = generation_defaults(model)
        preflight(cfg.engine, model)
    else:
        model, tokenizer, defaults = server.model, server.tokenizer, server.generation_defaults()
    store = None
    if cfg.output.path and not is_url(cfg.output.path):
        store = ListingStore(cfg.output_dir / STATE_DIR, save_listing)
    source = open_source(cfg.source, cfg.num_ranks, cfg.rank, store)
    sampling = cfg.sampling.resolve(defaults)
    adapters = check_adapters(cfg.engine.loras, model) if cfg.engine.loras else []
    builder = PromptBuilder(
        cfg.prompt,
        tokenizer,
        cfg.output.keep_columns,
        cfg.sampling.max_tokens_column,
        sampling,
        cfg.engine.seed,
        adapters=tuple(a.name for a in adapters),
        lora_column=cfg.lora_column,
        model_names=model_names(cfg.engine.model, model),
    )
    wanted = builder.columns()
    if cfg.source.id_column is not None:
        wanted[cfg.source.id_column] = "--id-column"
    require_columns(source, wanted)
    builder.check_types(source.field)
    server_settings = None if server is None else server.settings(cfg.prompt.uses_chat_template)
    fingerprint = run_fingerprint(
        cfg,
        model,
        source.identity(),
        builder.chat_template,
        sampling,
        adapters,
        server_settings,
    )
    return Job(model, source, builder, sampling, fingerprint)


def model_names(given: str | None, model: str) -> tuple[str, ...]:
    """The names a request may use for the base model (--openai-batch lines' model): the
    --model value as given, the resolved model, and its folder's name."""
    names = [n for n in (given, model, Path(model).name) if n]
    return tuple(dict.fromkeys(names))
