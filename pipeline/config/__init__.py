"""The validated, frozen settings of one run. The CLI builds them; every other module only reads them.

One module per concern, every name importable from here (`from pipeline.config import RunConfig`):

  inputs.py  SourceConfig (where rows come from), PromptConfig (how a row becomes a prompt)
  engine.py  EngineConfig (the in-process vLLM engine), ServerConfig (an OpenAI-compatible server)
  run.py     OutputConfig (where results go), RunConfig (the whole run: ranks, restarts, errors)
  bench.py   BenchConfig, MemoryBenchConfig (`batchgen bench`)
  tune.py    TuneConfig (`batchgen tune`)

Sampling settings are pipeline.sampling's (SamplingConfig), re-exported here.
"""

from pipeline.config.bench import (
    BenchConfig,
    MemoryBenchConfig,
    ReuseLookupConfig,
    ScaleBenchConfig,
)
from pipeline.config.engine import PROMPT_FORMS, EngineConfig, ServerConfig
from pipeline.config.inputs import INPUT_FORMATS, PromptConfig, SourceConfig, input_builder
from pipeline.config.run import OutputConfig, RunConfig
from pipeline.config.tune import TuneConfig
from pipeline.sampling import SamplingConfig

__all__ = [
    "BenchConfig",
    "MemoryBenchConfig",
    "ReuseLookupConfig",
    "ScaleBenchConfig",
    "TuneConfig",
    "INPUT_FORMATS",
    "PROMPT_FORMS",
    "EngineConfig",
    "OutputConfig",
    "PromptConfig",
    "RunConfig",
    "SamplingConfig",
    "ServerConfig",
    "SourceConfig",
    "input_builder",
]
