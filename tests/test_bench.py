"""`batchgen bench`: flag validation, the prompt set, the memory/I-O bench on small inputs, and one
tiny end-to-end throughput run on the real engine. Speed targets are met by the benchmark itself
(docs/benchmarks.md), never asserted here."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from conftest import BATCHGEN, REAL_ENGINE, Group, run_cli, run_subprocess

from pipeline.bench import BenchConfig, make_prompts
from pipeline.bench.stats import bootstrap_median, spread, spread_text
from pipeline.bench.steptrace import read_events, summarize
from pipeline.config import EngineConfig
from pipeline.errors import ConfigError

# (arguments after `bench`, the exact error line); all fail before any engine or model loads.
BAD_BENCH_FLAGS = [
    pytest.param(
        ["--memory", "--prompts", "8"],
        "--prompts: only for the throughput bench; drop --memory",
        id="memory-with-prompts",
    ),
    pytest.param(
        ["--memory", "--with-transformers", "--rounds", "2"],
        "--rounds, --with-transformers: only for the throughput bench; drop --memory",
        id="memory-with-two-throughput-flags",
    ),
    pytest.param(["--memory-rows", "10"], "--memory-rows needs --memory", id="rows-alone"),
    pytest.param(
        ["--memory", "--memory-rows", "10,x"],
        "Invalid value for --memory-rows: '10,x': expected row counts separated by commas, "
        "e.g. 250000,1000000",
        id="rows-not-numbers",
    ),
    pytest.param(
        ["--memory", "--memory-rows", "0"],
        "Invalid value for --memory-rows: '0': expected row counts separated by commas, "
        "e.g. 250000,1000000",
        id="rows-zero",
    ),
    pytest.param(
        ["--engine", "fake"],
        "--engine fake: the throughput bench compares batchgen with vLLM; use --memory for the "
        "fake engine",
        id="fake-engine-throughput",
    ),
    pytest.param(
        ["--min-tokens", "9", "--max-tokens", "8"],
        "--min-tokens 9 and --max-tokens 8: need 1 <= --min-tokens <= --max-tokens",
        id="min-above-max-tokens",
    ),
    pytest.param(
        ["--min-prompt-tokens", "0"],
        "--min-prompt-tokens 0 and --max-prompt-tokens 512: need 1 <= --min-prompt-tokens <= "
        "--max-prompt-tokens",
        id="zero-prompt-tokens",
    ),
    pytest.param(["--prompts", "0"], "--prompts 0: must be at least 1", id="no-prompts"),
    pytest.param(["--rounds", "0"], "--rounds 0: must be at least 1", id="no-rounds"),
    pytest.param(
        ["--budget-seconds", "-1"],
        "--budget-seconds must be 0 (no limit) or more",
        id="negative-budget",
    ),
    pytest.param(
        ["--rows-per-shard", "0"], "--rows-per-shard 0: must be at least 1", id="zero-shard"
    ),
    pytest.param(
        ["--system-prompt", "Be brief.", "--no-chat"],
        "--system-prompt needs the chat template: drop --no-chat",
        id="system-prompt-without-chat",
    ),
    pytest.param(
        ["--memory", "--system-prompt", "Be brief."],
        "--system-prompt: only for the throughput bench; drop --memory",
        id="system-prompt-with-memory",
    ),
    pytest.param(
        ["--memory", "--task", "Rewrite this.", "--stop-at-eos"],
        "--stop-at-eos, --task: only for the throughput bench; drop --memory",
        id="rewrite-job-with-memory",
    ),
    pytest.param(
        ["--task", "  "], "--task: give the instruction every prompt starts with", id="blank-task"
    ),
    pytest.param(
        ["--replicas-per-gpu", "1,x"],
        "Invalid value for --replicas-per-gpu: '1,x': expected distinct replica counts separated "
        "by commas, e.g. 1,2",
        id="replicas-not-numbers",
    ),
    pytest.param(
        ["--replicas-per-gpu", "2,2"],
        "Invalid value for --replicas-per-gpu: '2,2': expected distinct replica counts separated "
        "by commas, e.g. 1,2",
        id="replicas-twice",
    ),
    pytest.param(
        ["--replicas-per-gpu", "1,2", "--with-transformers"],
        "--replicas-per-gpu and --raw-defaults run each side on engines of its own: drop "
        "--server and --with-transformers",
        id="replicas-with-transformers",
    ),
    pytest.param(
        ["--memory", "--replicas-per-gpu", "2"],
        "--replicas-per-gpu: only for the throughput bench; drop --memory",
        id="replicas-with-memory",
    ),
    pytest.param(
        ["--memory", "--server", "http://gpu7:8000/v1"],
        "--server: only for the throughput bench; drop --memory",
        id="server-with-memory",
    ),
    pytest.param(
        ["--trace-after", "5"], "--trace-after needs --trace-steps N", id="trace-after-alone"
    ),
    pytest.param(
        ["--trace-steps", "8", "--server", "http://gpu7:8000/v1"],
        "--trace-steps traces in-process engines; a server's own profiler is its "
        "--profiler-config: drop --server",
        id="trace-with-server",
    ),
    pytest.param(
        ["--memory", "--trace-steps", "8"],
        "--trace-steps: only for the throughput bench; drop --memory",
        id="trace-with-memory",
    ),
    pytest.param(
        ["--reuse-lookup", "0"], "--reuse-lookup 0: must be at least 1 row", id="no-lookup-rows"
    ),
    pytest.param(
        ["--raw-defaults", "--dtype", "float32"],
        "--raw-defaults: the engine flags set none of the settings batchgen tune searches "
        "(speculative_config, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, "
        "enable_prefix_caching, gpu_memory_utilization, max_cudagraph_capture_size, quantization), so both "
        "sides would run vLLM's defaults; give the tuned settings, e.g. --max-num-seqs 64 "
        "--engine-arg max_num_batched_tokens=8192",
        id="raw-defaults-of-untuned-settings",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_BENCH_FLAGS)
def test_bad_bench_flags_are_usage_errors(args: list[str], message: str) -> None:
    result = run_cli("bench", *args, expect=2)
    assert result.output.endswith(f"\nError: {message}\n"), result.output


def test_prompt_set_is_deterministic_and_mixed() -> None:
    texts, budgets = make_prompts(200, 16, 512, 8, 128, seed=3)
    assert (texts, budgets) == make_prompts(200, 16, 512, 8, 128, seed=3)
    assert make_prompts(200, 16, 512, 8, 128, seed=4) != (texts, budgets)
    assert len(set(texts)) == 200  # every prompt is distinct: no accidental prefix-cache hits
    assert min(budgets) >= 8 and max(budgets) <= 128
    # Mixed lengths: log-uniform budgets put most rows short and a few long.
    assert sum(b < 32 for b in budgets) > 80 and sum(b > 96 for b in budgets) > 5
    chars = sorted(len(t) for t in texts)
    assert chars[0] < 150 and chars[-1] > 1500


def test_fixed_lengths_when_min_equals_max() -> None:
    _, budgets = make_prompts(20, 64, 64, 32, 32)
    assert budgets == [32] * 20


def test_one_task_for_every_prompt_keeps_the_prompt_set_otherwise() -> None:
    """--task changes each prompt's instruction and nothing else: same budgets, same prose."""
    mixed, budgets = make_prompts(50, 64, 512, 8, 512, seed=2)
    task = "Rewrite the following text in a formal tone."
    texts, same_budgets = make_prompts(50, 64, 512, 8, 512, seed=2, task=task)
    assert same_budgets == budgets
    assert all(t.startswith(f"{task} (note {i}) ") for i, t in enumerate(texts))
    # The prose after the instruction is the mixed set's, cut at the same place.
    assert [t.split(") ", 1)[1] for t in texts] == [m.split(") ", 1)[1] for m in mixed]


@pytest.mark.parametrize(
    ("cfg", "ignore_eos"),
    [
        (BenchConfig(), True),
        (BenchConfig(stop_at_eos=True), False),
        (BenchConfig(choice=("yes", "no")), False),
    ],
)
def test_budgets_are_caps_when_outputs_stop_at_eos(
    tmp_path: Path, cfg: BenchConfig, ignore_eos: bool
) -> None:
    """Without --stop-at-eos (or a grammar) every budget is generated in full, so the bench can
    check both sides generated the same tokens; with it each side's own tokens count."""
    from pipeline.bench.throughput import bench_run_config

    run_cfg = bench_run_config(cfg, tmp_path / "p.parquet", tmp_path / "out", 4)
    assert dict(run_cfg.sampling.given).get("ignore_eos", False) is ignore_eos
    assert cfg.own_lengths is not ignore_eos


def test_bench_config_is_the_python_api_of_the_bench_flags() -> None:
    """The fields behind --json-schema/--choice/--logprobs make the request both sides send;
    --raw-defaults gives the raw side vLLM's defaults for the tuned settings."""
    cfg = BenchConfig(choice=("yes", "no"), logprobs=2)
    assert cfg.request == (("choice", ("yes", "no")), ("logprobs", 2))
    assert BenchConfig().request == () and BenchConfig().raw_engine is None
    tuned = EngineConfig(max_num_seqs=8, engine_args=(("max_num_batched_tokens", 4096),))
    raw = BenchConfig(engine=tuned, raw_defaults=True).raw_engine
    assert raw is not None and (raw.max_num_seqs, raw.engine_args) == (None, ())
    assert BenchConfig(engine=tuned, raw_defaults=True).warm_sides


def test_rows_per_shard_defaults_to_an_eighth_of_the_prompts_at_most_2000() -> None:
    assert BenchConfig(prompts=256).shard_rows == 32
    assert BenchConfig(prompts=100_000).shard_rows == 2000
    assert BenchConfig(prompts=3).shard_rows == 1
    assert BenchConfig(prompts=256, rows_per_shard=7).shard_rows == 7
    with pytest.raises(ConfigError, match="--rounds 0"):
        BenchConfig(rounds=0)


def test_memory_bench_on_small_inputs(tmp_path: Path) -> None:
    """Each size runs in its own process through the fake engine and reports sane figures."""
    result = run_cli(
        "bench",
        "--memory",
        "--memory-rows",
        "900,300",
        "--rows-per-shard",
        "200",
        "--work-dir",
        tmp_path,
        "--json",
    )
    report = json.loads(result.stdout)
    assert report["engine"] == "fake" and report["rows_per_shard"] == 200
    sizes = report["sizes"]
    assert [s["rows"] for s in sizes] == [300, 900]  # smallest first
    assert [s["shards"] for s in sizes] == [math.ceil(300 / 200), math.ceil(900 / 200)]
    for s in sizes:
        assert 50 < s["peak_rss_mb"] < 2048
        assert s["rss_before_run_mb"] < s["peak_rss_mb"]
        assert s["rows_per_s"] > 0 and s["seconds"] > 0
    assert report["peak_rss_mb_max"] == max(s["peak_rss_mb"] for s in sizes)
    assert report["peak_rss_growth_mb"] == round(
        sizes[1]["peak_rss_mb"] - sizes[0]["peak_rss_mb"], 1
    )
    assert report["io_rows_per_s"] == sizes[1]["rows_per_s"]
    assert report["machine"]["cpu_cores"] >= 1
    assert list(tmp_path.iterdir()) == []  # inputs and outputs are cleaned up


def test_memory_bench_prints_a_table(tmp_path: Path) -> None:
    result = run_cli("bench", "--memory", "--memory-rows", "50", "--work-dir", tmp_path)
    lines = result.stdout.splitlines()
    assert lines[1] == (
        "fake engine, chat template on, a shard every 2,000 rows; each size in a fresh process"
    )
    assert lines[4].split()[0] == "50"
    assert lines[-1].startswith(
        "I/O path (read -> prompt build/tokenize -> fake engine -> Parquet): "
    )


@pytest.mark.engine
def test_bench_json_end_to_end_on_the_real_engine(tmp_path: Path) -> None:
    """8 prompts x up to 8 tokens, one round: the whole bench runs and reports a ratio. With a
    system prompt: the bench itself fails unless both sides send the same prompt tokens."""
    result = run_cli(
        "bench",
        *REAL_ENGINE,
        "--system-prompt",
        "You answer in one short sentence.",
        "--prompts",
        "8",
        "--min-tokens",
        "2",
        "--max-tokens",
        "8",
        "--max-prompt-tokens",
        "64",
        "--rounds",
        "1",
        "--work-dir",
        tmp_path,
        "--json",
    )
    report = json.loads(result.stdout)
    _, budgets = make_prompts(8, 16, 64, 2, 8)
    assert report["prompts"] == 8
    assert report["output_tokens"] == sum(budgets)  # ignore_eos: every budget generated in full
    assert isinstance(report["ratio"], float) and report["ratio"] > 0
    assert report["raw_output_tok_s"] > 0 and report["batchgen_output_tok_s"] > 0
    # One round: the per-round ratio, its median and the ratio of the medians are one number
    # (up to the rounding of the tok/s figures to 0.1).
    expected = report["batchgen_output_tok_s"] / report["raw_output_tok_s"]
    assert math.isclose(report["ratio"], expected, rel_tol=0.02)
    assert report["ratio_per_round"] == [report["ratio"]] == [report["ratio_of_medians"]]
    assert report["engine_start_s"] >= 0
    assert report["dtype"] == "float32" and report["max_model_len"] == 512
    assert report["system_prompt_chars"] == len("You answer in one short sentence.")
    assert isinstance(report["prefix_caching"], bool)
    assert report["shards_per_run"] == 8  # rows_per_shard 8 // 8 = 1
    assert len(report["rounds"]) == 1
    assert report["machine"]["vllm"]
    # The KV cache vLLM sized, against the arithmetic from the model's config: on CPU the cache
    # is VLLM_CPU_KVCACHE_SPACE GiB, K and V of every layer's KV heads a token, in float32.
    config = json.loads((Path(report["model"]) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4
    expected = float(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * 2**30 / per_token
    assert 0.95 * expected <= report["kv_cache_tokens"]["batchgen"] <= expected


@pytest.mark.engine
def test_bench_traces_engine_steps_on_the_real_engine(tmp_path: Path) -> None:
    """--trace-steps 6 --trace-after 2: after the timed round, one more pass of each side with
    vLLM's torch profiler on. Each side's trace is kept under the work folder and read back:
    6 steps traced are 6 step markers, 5 periods between their starts (so vLLM honoured the
    skip and the limit), every period spent mostly in the worker's execute on this CPU engine,
    no device activity, and all 12 prompts in each step (each generates at least 8 tokens, so
    steps 3-8 decode every one). Its own process and engine, as a user runs it: the profiler is
    set when an engine starts, so this cannot use the engine the tests share."""
    result = run_subprocess("bench", *REAL_ENGINE, "--prompts", "12", "--min-tokens", "8",
                            "--max-tokens", "16", "--max-prompt-tokens", "64", "--rounds", "1",
                            "--trace-steps", "6", "--trace-after", "2", "--work-dir", tmp_path,
                            "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    trace = json.loads(result.stdout)["step_trace"]
    assert trace["traced_steps"] == 6 and trace["skipped_steps"] == 2
    for side in ("raw", "batchgen"):
        [s] = trace[side]  # one engine
        assert s["steps"] == 5, s
        assert s["trace"].startswith(f"{side}/") and (tmp_path / "trace" / s["trace"]).is_file()
        assert s["gpu_busy_share"] is None and s["gpu_events"] == 0
        assert 0.5 < s["execute_share"] <= 1
        assert s["step_ms"]["median"] >= s["execute_ms"]["median"] > 0
        assert s["requests_per_step"]["median"] == 12 == s["tokens_per_step"]["median"]
    assert "engine steps, traced after the timed rounds" not in result.stdout  # JSON only


@pytest.mark.engine
def test_warm_sides_trace_each_engine_in_its_worker(tmp_path: Path) -> None:
    """The same trace on warm sides (`--replicas-per-gpu 1`: raw and batchgen each on an engine
    of its own, in a worker process): each worker turns its engine's profiler on for the traced
    pass, and each engine's trace is filed under its side."""
    result = run_subprocess("bench", *REAL_ENGINE, "--replicas-per-gpu", "1", "--prompts", "12",
                            "--min-tokens", "8", "--max-tokens", "16", "--max-prompt-tokens",
                            "64", "--rounds", "1", "--trace-steps", "6", "--trace-after", "2",
                            "--work-dir", tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for side in ("raw", "batchgen"):
        assert f"  {side}: 5 steps, median " in result.stdout, result.stdout
        [trace] = (tmp_path / "trace" / side).glob("*.pt.trace.json.gz")
        assert summarize(read_events(trace))["requests_per_step"]["median"] == 12


@pytest.mark.engine
def test_a_stopped_bench_closes_both_engines_and_exits_75_in_one_line(tmp_path: Path) -> None:
    """SIGTERM to `bench --raw-defaults` once the raw side's engine is up and batchgen's is
    starting (as `timeout` or a scheduler's time limit sends it): exit 75, one line, no
    traceback, and no process of the bench left: the idle worker closes, the starting one is
    stopped. Before, the bench died of the signal and left its workers to notice the closed
    pipe (a real engine's worker could linger, as the tune's did)."""
    cmd = [str(BATCHGEN), "bench", "--raw-defaults", "--max-num-seqs", "4", *REAL_ENGINE,
           "--prompts", "8", "--min-tokens", "2", "--max-tokens", "4", "--max-prompt-tokens", "64",
           "--work-dir", str(tmp_path)]  # fmt: skip
    with Group(cmd) as bench:
        bench.signal_at("raw rank 0 ready", 240)
        code, out, err = bench.finish(120)
        assert code == 75, err
        assert "bench: stopped by SIGTERM; no figures (a bench keeps no state: rerun it)" in err
        assert "Traceback" not in err and out == ""
        bench.wait_gone(30, "a worker or engine of the bench outlived it")


def test_spread_reports_median_min_max_and_a_reproducible_bootstrap_interval() -> None:
    ratios = [0.84, 1.16, 1.07, 1.02, 0.98]
    s = spread(ratios)
    assert (s["median"], s["min"], s["max"], s["rounds"]) == (1.02, 0.84, 1.16, 5)
    lo, hi = s["bootstrap_90"]
    assert 0.84 <= lo <= 1.02 <= hi <= 1.16 and lo < hi
    assert spread(ratios) == s  # seeded: the same rounds give the same interval
    assert spread_text(s) == (
        f"1.020 (min-max 0.840-1.160, 90% bootstrap {lo:.3f}-{hi:.3f}, 5 rounds)"
    )
    assert bootstrap_median([1.5]) == (1.5, 1.5)
    # five rounds: a 90% interval of the median spans about min-max; more rounds narrow it
    nine = spread([0.84, 1.16, 1.07, 1.02, 0.98, 1.0, 1.05, 0.95, 1.1])
    assert 0.84 < nine["bootstrap_90"][0] < nine["median"] < nine["bootstrap_90"][1] < 1.16
