"""`batchgen bench`: batchgen's throughput as a ratio to raw vLLM on the same work, and the I/O
path's speed and memory with the fake engine.

  workload.py    the prompt sets
  throughput.py  raw `LLM.generate` vs `batchgen run` on one engine (`run_throughput`)
  memory.py      peak RSS and rows/s of the I/O path with the fake engine (`run_memory`)
  machine.py     the machine a figure was measured on, other processes' CPU share, stdout
"""

from pipeline.bench.machine import reserve_stdout, to_json
from pipeline.bench.memory import format_memory, run_memory
from pipeline.bench.throughput import BenchConfig, format_throughput, run_throughput
from pipeline.bench.workload import make_prompts

__all__ = [
    "BenchConfig",
    "format_memory",
    "format_throughput",
    "make_prompts",
    "reserve_stdout",
    "run_memory",
    "run_throughput",
    "to_json",
]
