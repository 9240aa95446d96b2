"""batchgen: offline batch inference over datasets with vLLM, into sharded, resumable Parquet.

The Python API is `run`, which takes the same config dataclasses the CLI builds from its flags
(pipeline.config, pipeline.sampling); everything heavy is imported when it is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import EngineConfig, OutputConfig, PromptConfig, SourceConfig
    from pipeline.runner import RunResult
    from pipeline.sampling import SamplingConfig

from pipeline.version import __version__

__all__ = ["__version__", "run"]


def run(
    source: SourceConfig,
    prompt: PromptConfig,
    output: OutputConfig,
    *,
    engine: EngineConfig | None = None,
    sampling: SamplingConfig | None = None,
    **settings: Any,
) -> RunResult:
    """Run (or resume) one rank of a batch job, as `batchgen run` does; return its summary.

    `settings` are the other fields of `pipeline.config.RunConfig` (`num_ranks`, `rank`,
    `max_error_rate`, `engine_restarts`, ...), with the same defaults as the flags; a rank is
    never read from a launcher's environment here: pass `num_ranks` and `rank` yourself.
    Rerunning with the same settings resumes; a bad setting raises `pipeline.errors.ConfigError`,
    a failure `pipeline.errors.BatchgenError`, each with the one-line message the CLI prints.

    Example (the sample job of `make run`, from a notebook, an Airflow task or a script):

        from pipeline import run
        from pipeline.config import OutputConfig, PromptConfig, SourceConfig
        from pipeline.sampling import SamplingConfig

        result = run(
            SourceConfig(parquet="data/prompts.parquet"),
            PromptConfig(prompt_column="prompt", chat=True),
            OutputConfig(path="out/sample"),
            sampling=SamplingConfig.of(max_tokens=128),
        )
        print(result.status, result.report["committed"]["rows"])  # finished 48

    `result.status` is "finished", "interrupted" (a stop signal; rerun to resume) or "noop"
    (it had finished before); `result.report` is the rank's report as its manifest records it:
    "this_run" (prompts, rows, errors, tokens, finish reasons, seconds, output tok/s) and
    "committed" (prompts, rows, errors and shards in the output folder).
    """
    from pipeline.config import EngineConfig, RunConfig
    from pipeline.runner import run as run_rank
    from pipeline.sampling import SamplingConfig

    cfg = RunConfig(
        source=source,
        prompt=prompt,
        engine=engine if engine is not None else EngineConfig(),
        sampling=sampling if sampling is not None else SamplingConfig(),
        output=output,
        **settings,
    )
    return run_rank(cfg)
