"""`batchgen run` flag handling, --config files, lazy imports, and a fake-engine run's output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAKE_ENGINE, REPO, read_output, run_cli

import pipeline
from pipeline.cli.run import run
from pipeline.models import ensure_bundled_model
from pipeline.prompts import load_tokenizer
from pipeline.sinks import METADATA_KEY

RESERVED = (
    "id, sample_index, text, finish_reason, prompt_tokens, completion_tokens, error, request_key, reused_from, prompt, "
    "parsed_ok, logprobs, cumulative_logprob, prompt_logprobs, sampling, adapter, reasoning, "
    "reasoning_tokens, reasoning_ended"
)

# (arguments after `run`, the exact error line). IN is the prompts file, OUT a fresh folder.
BAD_FLAGS = [
    pytest.param(
        ["--prompt-column", "prompt", "-o", "OUT"],
        "give exactly one input: --input PATH, --parquet PATH, --dataset NAME_OR_DIR or --openai-batch FILE.jsonl",
        id="no-input",
    ),
    pytest.param(
        ["--parquet", "IN", "--dataset", "x", "--prompt-column", "prompt", "-o", "OUT"],
        "give exactly one input: --input PATH, --parquet PATH, --dataset NAME_OR_DIR or --openai-batch FILE.jsonl",
        id="parquet-and-dataset",
    ),
    pytest.param(
        ["--parquet", "IN", "--streaming", "--prompt-column", "prompt", "-o", "OUT"],
        "--data-files, --config-name, --revision and --streaming apply to --dataset, not to "
        "--parquet",
        id="streaming-with-parquet",
    ),
    pytest.param(
        ["--parquet", "IN", "-o", "OUT"],
        "give exactly one of --prompt-column, --template or --messages-column",
        id="no-prompt-flag",
    ),
    pytest.param(
        ["--parquet", "IN", "--prompt-column", "prompt", "--template", "{prompt}", "-o", "OUT"],
        "give exactly one of --prompt-column, --template or --messages-column "
        "(got --prompt-column, --template)",
        id="two-prompt-flags",
    ),
    pytest.param(
        ["--parquet", "IN", "--messages-column", "m", "--chat", "-o", "OUT"],
        "--messages-column is always rendered with the chat template; drop --chat",
        id="messages-with-chat",
    ),
    pytest.param(
        [
            "--parquet",
            "IN",
            "--prompt-column",
            "prompt",
            "--system-prompt",
            "Be brief.",
            "-o",
            "OUT",
        ],
        "--system-prompt needs --chat or --messages-column",
        id="system-prompt-without-chat",
    ),
    pytest.param(
        ["--parquet", "IN", "--prompt-column", "prompt", "--n", "2", "--temperature", "0"]
        + ["-o", "OUT"],
        "--n 2 with greedy sampling (temperature 0) would repeat one text; pass --temperature "
        "above 0 or --n 1",
        id="n2-greedy",
    ),
    pytest.param(
        ["--parquet", "IN", "--prompt-column", "prompt", "--keep-columns", "topic,text"]
        + ["-o", "OUT"],
        f"--keep-columns text: clashes with batchgen's own output columns ({RESERVED}); rename "
        "the input column first",
        id="keep-reserved-column",
    ),
    pytest.param(
        ["--parquet", "IN", "--prompt-column", "prompt", "--keep-columns", "nope", "-o", "OUT"],
        "--keep-columns 'nope': no such column; the input's columns are: prompt, topic",
        id="keep-unknown-column",
    ),
    pytest.param(
        ["--parquet", "IN", "--prompt-column", "prompt", "--shard-index", "1", "-o", "OUT"],
        "--num-ranks and --rank go together.",
        id="shard-index-alone",
    ),
    pytest.param(
        ["--parquet", "IN", "--prompt-column", "prompt", "--num-shards", "3", "-o", "OUT"],
        "--num-ranks 3 without --rank: pass --rank too, or run under a launcher "
        "that gives each process its rank (Slurm, torchrun, MPI, a Kubernetes Indexed Job)",
        id="num-shards-alone",
    ),
    pytest.param(
        ["--parquet", "IN", "--prompt-column", "prompt", "--shard-index", "3"]
        + ["--num-shards", "3", "-o", "OUT"],
        "--rank 3: must be in 0..2 for --num-ranks 3",
        id="shard-index-out-of-range",
    ),
    pytest.param(
        ["--parquet", "IN", "--prompt-column", "prompt", "--engine-arg", "enable_prefix_caching"]
        + ["-o", "OUT"],
        "Invalid value for --engine-arg: 'enable_prefix_caching': expected KEY=VALUE, e.g. "
        "--engine-arg enable_prefix_caching=true",
        id="engine-arg-without-equals",
    ),
    pytest.param(
        ["--parquet", "IN", "--prompt-column", "prompt", "--engine-arg", "=1", "-o", "OUT"],
        "Invalid value for --engine-arg: '=1': expected KEY=VALUE, e.g. "
        "--engine-arg enable_prefix_caching=true",
        id="engine-arg-without-key",
    ),
    pytest.param(
        ["--parquet", "IN", "--prompt-column", "promt", "-o", "OUT"],
        "--prompt-column 'promt': no such column (did you mean 'prompt'?); the input's columns are: prompt, topic",
        id="unknown-prompt-column",
    ),
    pytest.param(
        ["--parquet", "IN", "--template", "Q: {prompt} in {question}", "-o", "OUT"],
        "--template field 'question': no such column; the input's columns are: prompt, topic",
        id="template-unknown-column",
    ),
    pytest.param(
        ["--parquet", "IN", "--prompt-column", "prompt"],
        "Missing option '--output' / '-o' (or `output` in --config).",
        id="missing-output",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_FLAGS)
def test_bad_flag_combinations_are_usage_errors(
    prompts_file: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    paths = {"IN": str(prompts_file), "OUT": str(tmp_path / "out")}
    result = run_cli("run", *FAKE_ENGINE, *[paths.get(a, a) for a in args], expect=2)
    assert result.output.endswith(f"\nError: {message}\n"), result.output
    assert not list((tmp_path / "out").glob("**/*.parquet"))


# --- --config FILE -----------------------------------------------------------------------------


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list:
    """The RunConfig the CLI would run, with the runner replaced by a recorder."""
    import pipeline.runner

    configs: list = []

    def record(cfg: Any) -> Any:
        configs.append(cfg)
        return pipeline.runner.RunResult("finished", cfg.output_dir)

    monkeypatch.setattr(pipeline.runner, "run", record)
    return configs


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_file_keys_are_long_flag_names(tmp_path: Path, captured: list) -> None:
    config = write_toml(
        tmp_path / "job.toml",
        'parquet = "in.parquet"\n'
        'prompt-column = "prompt"\n'
        "chat = true\n"
        'system-prompt = "Be brief."\n'
        "max-tokens = 64\n"
        "temperature = 0.7\n"
        'stop = "END"\n'  # a scalar for a repeatable flag
        'engine-arg = ["enable_prefix_caching=true", "max_num_batched_tokens=4096"]\n'
        'keep-columns = "topic,source"\n'
        "num-shards = 4\n"
        "shard-index = 2\n"
        'engine = "fake"\n'
        'output = "out/job"\n',
    )
    run_cli("run", "--config", config)
    (cfg,) = captured
    assert cfg.source.parquet == "in.parquet"
    assert (cfg.prompt.prompt_column, cfg.prompt.chat) == ("prompt", True)
    assert cfg.prompt.system_prompt == "Be brief."
    assert (cfg.sampling.get("max_tokens"), cfg.sampling.get("temperature")) == (64, 0.7)
    assert cfg.sampling.get("stop") == ("END",)
    assert cfg.engine.engine_args == (
        ("enable_prefix_caching", True),
        ("max_num_batched_tokens", 4096),
    )
    assert cfg.engine.backend == "fake"
    assert cfg.output.keep_columns == ("topic", "source")
    assert (cfg.num_ranks, cfg.rank) == (4, 2)
    assert cfg.output.path == "out/job"


@pytest.mark.parametrize(
    "rank_flags",
    [
        ["--num-ranks", "4", "--rank", "2"],
        ["--num-shards", "4", "--shard-index", "2"],  # the old names, kept as aliases
        ["--num-ranks=4", "--shard-index=2"],
    ],
    ids=["rank-words", "old-shard-words", "mixed"],
)
def test_rank_flags_and_their_old_names_set_the_same_rank(
    tmp_path: Path, captured: list, rank_flags: list[str]
) -> None:
    run_cli(
        "run",
        *FAKE_ENGINE,
        "--parquet",
        "in.parquet",
        "--prompt-column",
        "p",
        "-o",
        "o",
        *rank_flags,
    )
    (cfg,) = captured
    assert (cfg.num_ranks, cfg.rank) == (4, 2)


def test_flags_override_the_config_file(tmp_path: Path, captured: list) -> None:
    config = write_toml(
        tmp_path / "job.toml",
        'parquet = "in.parquet"\n'
        'prompt-column = "prompt"\n'
        "max-tokens = 64\n"
        "temperature = 0.7\n"
        'stop = ["A", "B"]\n'
        'output = "out/job"\n',
    )
    run_cli(
        "run", "--max-tokens", "8", "--config", config, "--stop", "C", "-o", tmp_path / "elsewhere"
    )
    (cfg,) = captured
    assert cfg.sampling.get("max_tokens") == 8  # flag, though given before --config
    assert cfg.sampling.get("temperature") == 0.7  # file
    assert cfg.sampling.get("stop") == ("C",)  # a repeatable flag replaces the file's list
    assert cfg.output.path == str(tmp_path / "elsewhere")
    assert cfg.source.parquet == "in.parquet"


def long_flags() -> list[str]:
    """Every long flag of `batchgen run` but --config, as a user would type it in the file."""
    return sorted(
        opt[2:]
        for p in run.params
        if isinstance(p, click.Option) and p.name != "config"
        for opt in p.opts
        if opt.startswith("--")
    )


def test_config_file_unknown_key_lists_valid_keys(tmp_path: Path, captured: list) -> None:
    config = write_toml(tmp_path / "job.toml", 'parquet = "x.parquet"\npromt-column = "p"\n')
    result = run_cli("run", "--config", config, expect=2)
    valid = long_flags()
    assert {"engine", "prompt-column", "max-tokens", "n", "output"} <= set(valid)
    assert "backend" not in valid  # --engine's parameter name is not a flag
    assert "config" not in valid
    assert result.output.endswith(
        f"\nError: Invalid value for '--config': {config}: unknown key 'promt-column'; "
        f"valid keys are: {', '.join(valid)}\n"
    )
    assert captured == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "cannot read {path}: No such file or directory"),
        ("parquet = \n", "{path} is not valid TOML: "),
    ],
    ids=["missing-file", "bad-toml"],
)
def test_unreadable_config_file(
    tmp_path: Path, captured: list, text: str | None, message: str
) -> None:
    path = tmp_path / "job.toml"
    if text is not None:
        path.write_text(text)
    result = run_cli("run", "--config", path, "-o", tmp_path / "out", expect=2)
    assert f"\nError: Invalid value for '--config': {message.format(path=path)}" in result.output
    assert captured == []


# --- lazy imports ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["--help"], ["run", "--help"], ["plan", "--help"], ["show", "--help"], ["report", "--help"]],
    ids=["batchgen", "run", "plan", "show", "report"],
)
def test_help_imports_no_heavy_module(args: list[str]) -> None:
    script = (
        "import sys; from click.testing import CliRunner; from pipeline.cli import main\n"
        f"result = CliRunner().invoke(main, {args!r})\n"
        "assert result.exit_code == 0, result.output\n"
        "assert result.output.startswith('Usage: '), result.output\n"
        "print(sorted(m for m in ('vllm', 'torch', 'transformers', 'datasets') "
        "if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[]\n"


# --- a whole run on the fake engine ------------------------------------------------------------

EXPECTED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("error", pa.string()),
        pa.field("request_key", pa.binary(16)),
        pa.field("reused_from", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("topic", pa.string()),
    ]
)


def test_fake_engine_run_writes_the_documented_output(
    prompts_file: Path, tmp_path: Path, hf_offline: None
) -> None:
    out = tmp_path / "out"
    run_cli(
        "run",
        *FAKE_ENGINE,
        "--parquet",
        prompts_file,
        "--prompt-column",
        "prompt",
        "--keep-columns",
        "topic",
        "--keep-prompt",
        "--n",
        "2",
        "--temperature",
        "0.5",
        "--max-tokens",
        "5",
        "--rows-per-shard",
        "150",
        "-o",
        out,
    )
    source = pq.read_table(prompts_file).to_pydict()
    prompts, topics = source["prompt"], source["topic"]
    shards = sorted(p.name for p in out.glob("rank-00000/*.parquet"))
    # 400 rows; a shard never splits one prompt's samples.
    assert shards == [f"part-00000-{i:06d}.parquet" for i in range(3)]
    assert [pq.read_metadata(out / "rank-00000" / s).num_rows for s in shards] == [150, 150, 100]

    table = read_output(out)
    assert table.schema.remove_metadata() == EXPECTED_SCHEMA  # names, types and nullability
    assert table.num_rows == 400
    rows = table.to_pydict()
    assert rows["id"] == [f"in.parquet:{i}" for i in range(200) for _ in range(2)]
    assert rows["sample_index"] == [0, 1] * 200
    assert rows["prompt"] == [p for p in prompts for _ in range(2)]
    assert rows["topic"] == [t for t in topics for _ in range(2)]
    assert rows["error"] == [None] * 400
    assert rows["finish_reason"] == ["length"] * 400  # max_tokens 5 < the fake's 8
    assert rows["completion_tokens"] == [5] * 400
    tokenizer = load_tokenizer(str(ensure_bundled_model()))
    assert rows["prompt_tokens"] == [
        len(ids) for ids in tokenizer(prompts)["input_ids"] for _ in range(2)
    ]
    assert len(set(rows["text"])) == 400  # two different samples of 200 different prompts

    for shard in shards:
        meta = json.loads(pq.read_schema(out / "rank-00000" / shard).metadata[METADATA_KEY])
        assert meta["model"] == str(ensure_bundled_model())
        assert meta["model_impl"] == "transformers"
        assert meta["sampling"] == {
            "temperature": 0.5,  # the flag
            "top_p": 1.0,  # neither flag nor generation_config: vLLM's neutral value
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "max_tokens": 5,
            "stop": [],
            "n": 2,
        }
        assert meta["batchgen"] == pipeline.__version__ == version("batchgen")
        assert (meta["rank"], meta["num_shards"], meta["seed"]) == (0, 1, 0)

    # The hidden .batchgen/ state folder must not confuse a `datasets` reader.
    state = sorted(str(p.relative_to(out)) for p in (out / ".batchgen").rglob("*"))
    assert re.fullmatch(r"\.batchgen/inputs-[0-9a-f]{16}\.json\.gz", state.pop(0))  # the listing
    assert state == [
        ".batchgen/job.json",
        ".batchgen/rank-00000",
        ".batchgen/rank-00000/head-00000001.json",
        ".batchgen/rank-00000/lock",
        ".batchgen/rank-00000/manifest-00000001.json",
    ]
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    finally:
        datasets.enable_progress_bars()
    assert ds.num_rows == 400
    assert ds.column_names == EXPECTED_SCHEMA.names
    assert ds["id"] == rows["id"]
    assert ds["text"] == rows["text"]
