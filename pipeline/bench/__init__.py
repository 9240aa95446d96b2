"""`batchgen bench`: batchgen's throughput as a ratio to raw vLLM on the same work, and the I/O
path's speed and memory with the fake engine. Its settings (BenchConfig and one dataclass per
other kind of bench, each field a flag) are pipeline/config/bench.py's.

  workload.py    the prompt sets
  throughput.py  raw `LLM.generate` vs `batchgen run` on one engine (`run_throughput`)
  throughput_report.py  its report and text
  compare.py     the warm protocol: sides on engines of their own (--raw-defaults, replicas)
  warm.py        worker processes that keep each side's engines warm between rounds
  probe.py       GPU busy share and each side's CPU time during a pass
  stats.py       median, min-max and bootstrap interval of per-round figures
  memory.py      peak RSS and rows/s of the I/O path with the fake engine (`run_memory`)
  machine.py     the machine a figure was measured on, other processes' CPU share, stdout
"""

from pipeline.bench.machine import reserve_stdout, to_json
from pipeline.bench.memory import format_memory, run_memory
from pipeline.bench.throughput import BenchConfig, format_report, run_throughput
from pipeline.bench.workload import make_prompts

__all__ = [
    "BenchConfig",
    "format_memory",
    "format_report",
    "make_prompts",
    "reserve_stdout",
    "run_memory",
    "run_throughput",
    "to_json",
]
