"""Model FLOPs utilization of a `batchgen bench --json` report (or of a `--data-parallel` run's
token counts): the share of the accelerator's peak dense compute that the measured tokens/s
stand for.

    python jobs/tools/mfu.py REPORT.json --config MODEL/config.json [--peak-tflops 989.4]
    python jobs/tools/mfu.py --run PROMPTS PROMPT_TOKENS OUTPUT_TOKENS SECONDS --config ...

(`--run`: a run's own counts and its generate seconds, e.g. from the summary line of `batchgen
run`: "finished: 4,096 prompts ... | 845,109 prompt + 1,048,576 output tokens | generate ...").

FLOPs per token follow the usual count for a decoder (2 x the weights a token passes through,
plus attention over its context): every prompt token runs the layers; only output tokens (and
each prompt's last token) run the LM head; attention costs 4 x layers x heads x head_dim per
token of context, counted at the mean context each token sees. The default peak is an NVIDIA
H100/H200 SXM's dense bf16 figure (989.4 TFLOP/s); the device host's own measured matmul peak
(about 790 TFLOP/s) is the figure to pass for "distance to what this card actually does".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

H100_H200_DENSE_BF16_TFLOPS = 989.4


def layer_weights(cfg: dict) -> tuple[int, int]:
    """Weights one token passes through in the decoder layers, and in the LM head."""
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    attn = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o; k, v
    mlp = 3 * hidden * cfg["intermediate_size"]  # gate, up, down (SwiGLU)
    return cfg["num_hidden_layers"] * (attn + mlp), hidden * cfg["vocab_size"]


def flops(cfg: dict, prompts: int, prompt_tokens: int, output_tokens: int) -> float:
    """Model FLOPs of one pass: `prompts` prompts of `prompt_tokens` in all, `output_tokens`."""
    body, head = layer_weights(cfg)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    per_context_token = 4 * cfg["num_hidden_layers"] * heads * head_dim
    mean_prompt = prompt_tokens / prompts
    mean_output = output_tokens / prompts
    # Mean context seen: half the prompt for prompt tokens (causal), prompt + half the output
    # for output tokens.
    attention = per_context_token * (
        prompt_tokens * mean_prompt / 2 + output_tokens * (mean_prompt + mean_output / 2)
    )
    tokens = prompt_tokens + output_tokens
    return 2 * body * tokens + 2 * head * (output_tokens + prompts) + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, nargs="?", help="`batchgen bench --json` output")
    parser.add_argument(
        "--run",
        nargs=4,
        type=float,
        metavar=("PROMPTS", "PROMPT_TOKENS", "OUTPUT_TOKENS", "SECONDS"),
        help="a run's counts and generate seconds instead of a bench report",
    )
    parser.add_argument("--config", type=Path, required=True, help="the model's config.json")
    parser.add_argument("--peak-tflops", type=float, default=H100_H200_DENSE_BF16_TFLOPS)
    args = parser.parse_args()
    if (args.report is None) == (args.run is None):
        parser.error("give a bench report or --run, not both")
    cfg = json.loads(args.config.read_text())
    out: dict = {"peak_tflops": args.peak_tflops, "model_params_per_token": sum(layer_weights(cfg))}
    if args.run is not None:
        prompts, prompt_tokens, output_tokens, seconds = args.run
        out["run"] = _utilization(
            cfg, args.peak_tflops, int(prompts), prompt_tokens, output_tokens, seconds
        )
    else:
        report = json.loads(args.report.read_text())
        # Output tokens of a pass: the budgets (ignore_eos), or the last raw pass's own count.
        prompts, prompt_tokens = report["prompts"], report["prompt_tokens"]
        output_tokens = report["output_tokens"]
        for side in ("raw", "batchgen"):
            seconds = (prompt_tokens + output_tokens) / report[f"{side}_total_tok_s"]
            out[side] = _utilization(
                cfg, args.peak_tflops, prompts, prompt_tokens, output_tokens, seconds
            )
    print(json.dumps(out, indent=1))


def _utilization(
    cfg: dict,
    peak_tflops: float,
    prompts: int,
    prompt_tokens: float,
    output_tokens: float,
    seconds: float,
) -> dict:
    achieved = flops(cfg, prompts, int(prompt_tokens), int(output_tokens)) / seconds
    return {
        "seconds": round(seconds, 2),
        "total_tok_s": round((prompt_tokens + output_tokens) / seconds, 1),
        "tflops": round(achieved / 1e12, 1),
        "mfu": round(achieved / (peak_tflops * 1e12), 3),
    }


if __name__ == "__main__":
    main()
