"""jobs/tools/mfu.py: the FLOPs count behind the MFU figures in docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "jobs" / "tools"))
import mfu  # noqa: E402

# Meta-Llama-3-8B's published shapes: 8.03B parameters, 0.525B of them the input embedding.
LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}


def test_weights_per_token_are_the_published_count_less_the_embedding() -> None:
    body, head = mfu.layer_weights(LLAMA3_8B)
    embedding = 4096 * 128256
    assert body + head + embedding == pytest.approx(8.03e9, rel=0.001)


def test_a_report_at_the_peak_rate_is_full_utilization(tmp_path) -> None:
    """Tokens/s chosen so that the pass does exactly peak FLOPs per second: MFU 1.0."""
    prompts, prompt_tokens, output_tokens = 100, 20_000, 10_000
    total = mfu.flops(LLAMA3_8B, prompts, prompt_tokens, output_tokens)
    # 2 x weights per token dominates; attention and the LM head add a few percent.
    body, _ = mfu.layer_weights(LLAMA3_8B)
    assert 1.0 < total / (2 * body * (prompt_tokens + output_tokens)) < 1.1
    seconds = total / 500e12
    report = {
        "prompts": prompts,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "raw_total_tok_s": (prompt_tokens + output_tokens) / seconds,
        "batchgen_total_tok_s": (prompt_tokens + output_tokens) / seconds / 2,
    }
    (tmp_path / "r.json").write_text(json.dumps(report))
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs/tools/mfu.py"), str(tmp_path / "r.json"), "--config",
         str(tmp_path / "config.json"), "--peak-tflops", "500"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert result["raw"]["mfu"] == 1.0 and result["batchgen"]["mfu"] == 0.5
