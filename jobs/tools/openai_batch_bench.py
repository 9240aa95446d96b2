"""Streaming bench of batch request files (fake engine): peak RSS of `batchgen run
--openai-batch` and `batchgen export` at 100k and 1M lines, and exactly-once after a SIGKILL and
a resume. The request files go to a temporary folder and are deleted after.

Usage: python jobs/tools/openai_batch_bench.py [--lines 1000000] [--small 100000] [--json]
"""

from __future__ import annotations

from pipeline.bench.openai_batch import main

if __name__ == "__main__":
    main()
