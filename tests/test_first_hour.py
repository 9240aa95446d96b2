"""The first hour of a new user, with the fake engine where the engine does not matter: a
refused run leaves nothing behind; a Hub id without network is answered in seconds."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BATCHGEN, FAKE_ENGINE, SAMPLE, read_output, run_args, run_cli

from pipeline.engines.fake import FakeEngine


def files_under(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []


USAGE_ERRORS = {
    "missing column": (["--prompt-column", "promt"], "--prompt-column 'promt': no such column"),
    "missing id column": (["--id-column", "nope"], "nope"),
    "missing model folder": (["--model", "./no-such-model"], "--model ./no-such-model: no such"),
    "bad flag value": (["--temperature", "-1"], "temperature"),
}


@pytest.mark.parametrize("fresh", [True, False], ids=["new-folder", "empty-folder"])
@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_a_usage_error_leaves_no_file_under_out(tmp_path, case, fresh):
    out = tmp_path / "out"
    if not fresh:
        out.mkdir()
    flags, said = USAGE_ERRORS[case]
    result = run_cli(*run_args(SAMPLE, out, *FAKE_ENGINE, *flags), expect=2)
    assert said in result.output
    assert out.exists() is not fresh
    assert files_under(out) == []


def test_a_refusal_once_the_engine_runs_leaves_no_file_either(tmp_path, monkeypatch):
    """The engine's own sampling check comes after the rank's lock and manifest exist."""
    monkeypatch.setattr(FakeEngine, "check_sampling", lambda self, s: "--logprobs 99: too many")
    out = tmp_path / "out"
    result = run_cli(*run_args(SAMPLE, out, *FAKE_ENGINE), expect=2)
    assert "Error: --logprobs 99: too many" in result.output
    assert not out.exists()
    run_cli("status", out, expect=1)  # no run there, not "incomplete" (3)


def test_a_refused_rank_leaves_the_other_ranks_files(tmp_path):
    out = tmp_path / "out"
    run_cli(*run_args(SAMPLE, out, *FAKE_ENGINE, "--num-shards", "2", "--shard-index", "1"))
    before = files_under(out)
    flags = ["--num-shards", "2", "--shard-index", "0", "--prompt-column", "promt"]
    run_cli(*run_args(SAMPLE, out, *FAKE_ENGINE, *flags), expect=2)
    assert files_under(out) == before


def test_output_naming_a_file_says_it_is_a_file(tmp_path):
    existing = tmp_path / "results.parquet"
    existing.write_bytes(b"PAR1")
    result = run_cli(*run_args(SAMPLE, existing, *FAKE_ENGINE), expect=2)
    assert (
        f"Error: --output {existing} is a file, not a folder: batchgen writes a folder of "
        f"Parquet shards there; choose a folder path that is new or a folder (e.g. --output "
        f"{tmp_path / 'results'}-out)"
    ) in " ".join(result.output.split())
    assert existing.read_bytes() == b"PAR1"
    result = run_cli(*run_args(SAMPLE, existing / "out", *FAKE_ENGINE), expect=2)
    assert f"lies under {existing}, which is a file" in " ".join(result.output.split())


HUB_ID = "HuggingFaceTB/no-such-model-for-batchgen-tests"


@pytest.mark.parametrize(
    "env, said",
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set with no copy of it"),
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "(http://127.0.0.1:9) cannot be reached"),
    ],
    ids=["offline", "unreachable"],
)
def test_a_hub_id_without_network_is_a_usage_error_within_seconds(tmp_path, env, said):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **env}
    env.pop("HF_HUB_OFFLINE", None) if "HF_ENDPOINT" in env else None
    started = time.monotonic()
    proc = subprocess.run(
        [str(BATCHGEN), *run_args(SAMPLE, out, "--model", HUB_ID)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert time.monotonic() - started < 10
    assert proc.returncode == 2, proc.stderr
    error = " ".join(proc.stderr.split("Error: ", 1)[1].split())
    assert error.startswith(f"--model {HUB_ID}: not a local folder, and ")
    assert said in error
    assert "HF_HUB_OFFLINE=1" in error or "hf download" in error
    assert error.endswith("or pass --model a local model folder (config.json, weights, tokenizer)")
    assert "Traceback" not in proc.stderr and not out.exists()


def test_input_reads_the_format_its_extension_names(tmp_path, hf_offline):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = ["one", "two", "three"]
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (folder / "b.jsonl").write_text(json.dumps({"prompt": "four"}) + "\n")
    (folder / "c.csv").write_text("prompt\n" + "\n".join(prompts) + "\n")
    pq.write_table(pa.table({"prompt": prompts}), folder / "d.parquet")
    for given, rows in [("a.jsonl", 3), ("*.jsonl", 4), ("c.csv", 3), ("d.parquet", 3)]:
        out = tmp_path / f"out-{given.replace('*', 'all')}"
        run_cli("run", "--input", folder / given, "--prompt-column", "prompt", *FAKE_ENGINE,
                "--output", out)  # fmt: skip
        assert read_output(out).num_rows == rows, given
    result = run_cli("plan", "--input", folder / "a.jsonl", "--prompt-column", "prompt")
    assert f"input: {folder / 'a.jsonl'}" in result.output or str(folder / "a.jsonl") in (
        result.output
    )
    assert " json " not in result.output


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--input", "notes.txt"], "--input notes.txt: cannot tell its format from the extension"),
        (["--input", "a.jsonl", "--parquet", "b.parquet"], "give one input: --input, --parquet"),
        (["--input", "a.jsonl", "--limit", "0"], "--limit 0: give a number of rows, 1 or more"),
    ],
)
def test_input_and_limit_mistakes_are_one_line(tmp_path, flags, said):
    result = run_cli("run", *flags, "--prompt-column", "p", "--output", tmp_path / "o", expect=2)
    assert result.output.endswith(f"Error: {said}") or said in result.output
    assert not (tmp_path / "o").exists()


def test_limit_then_the_rest_exactly_once(tmp_path):
    out = tmp_path / "out"
    args = run_args(SAMPLE, out, *FAKE_ENGINE)
    result = run_cli(*args, "--limit", "10")
    assert "--limit 10: done" in result.output
    # Not "interrupted": nothing stopped it (the manifest's status is, for the rerun).
    assert "stopped at --limit 10: 10 prompts this run" in result.output
    assert "interrupted" not in result.output
    assert read_output_ids(out) == [f"prompts.parquet:{i}" for i in range(10)]
    plan = run_cli("plan", *args[1:], "--limit", "20")
    assert "10" in plan.output
    run_cli(*args)
    assert read_output_ids(out) == [f"prompts.parquet:{i}" for i in range(48)]


def read_output_ids(out: Path) -> list[str]:
    return sorted(read_output(out).column("id").to_pylist(), key=lambda s: int(s.split(":")[1]))


def test_try_prints_only_the_completion_on_stdout() -> None:
    """`batchgen try`: stdout holds the completion alone; the run's log lines go to stderr."""
    proc = subprocess.run(
        [str(BATCHGEN), "try", "hello there", *FAKE_ENGINE],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1, proc.stdout
    assert proc.stdout.startswith("fake "), proc.stdout
    assert "batchgen:" in proc.stderr
