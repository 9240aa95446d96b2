"""`batchgen run --data-parallel N` on the fake engine with N=4: every row exactly once and as one
process writes it, one terminal, signals passed on to every rank, a killed rank named and redone
by a rerun (on fewer slots), no rank left behind by a killed launcher; and the flag checks, the
slot plan and the combined progress line on their own. (The real engine: test_data_parallel_engine.py.)

Ranks are started through the tests' hooked launcher (tests/hooks.py) wherever the fake engine
must be slow, so a signal or a kill lands mid-run.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    FAKE_ENGINE,
    HOOKED_BATCHGEN,
    manifest_state,
    read_output,
    run_args,
    run_cli,
    write_prompts,
)

from pipeline.checkpoint import lock_path
from pipeline.cli.flags import run_config
from pipeline.cli.run import rank_flags, run
from pipeline.errors import ConfigError
from pipeline.progress import NodeProgress
from pipeline.ranks import resolve_rank
from pipeline.slots import plan_node

ROWS = 400
RANKS = 4
PER_RANK = ROWS // RANKS
# Slow enough that every rank has committed a shard and is still going when a test acts: one
# row per 0.3 s step and rank, so a 100-row rank generates for 30 s.
SLOW = {"BATCHGEN_FAKE_STEP_SECONDS": "0.3"}
SLOW_FLAGS = ["--max-num-seqs", "1"]


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same plan on any machine: no GPUs, so ranks are CPU ranks."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    ids = [f"q{i:03d}" for i in range(ROWS)]
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(ROWS)]
    return write_prompts(tmp_path / "rows.parquet", prompts, 50, id=ids)


def args(src: Path, out: Path, *extra: str) -> list[str]:
    return run_args(src, out, "--id-column", "id", "--rows-per-shard", "10", *FAKE_ENGINE, *extra)


def texts(out: Path) -> dict[str, str]:
    table = read_output(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "a row was written twice"
    return dict(zip(ids, table.column("text").to_pylist(), strict=True))


@pytest.fixture
def reference(src: Path, tmp_path: Path) -> dict[str, str]:
    """The rows as one process writes them."""
    out = tmp_path / "reference"
    run_cli(*args(src, out))
    result = texts(out)
    assert sorted(result) == [f"q{i:03d}" for i in range(ROWS)]
    return result


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The hooked batchgen in the background, its output into `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(
            [str(HOOKED_BATCHGEN), *cmd],
            env={**os.environ, **(env or {})},
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
        )


def wait_until(check, proc: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}:\n{log.read_text()}"
        if time.monotonic() >= deadline:
            # No launcher outlives a failed test to load the machine under the next ones (its
            # ranks die with it: test_a_killed_launcher_leaves_no_rank_running).
            proc.kill()
            proc.wait(timeout=60)
            raise AssertionError(f"no {what} in {timeout}s:\n{log.read_text()}")
        time.sleep(0.1)


def every_rank_committed(out: Path) -> bool:
    return all(list(out.glob(f"rank-*/part-{r:05d}-*.parquet")) for r in range(RANKS))


def rank_pids(out: Path) -> dict[int, int]:
    """Each rank's pid, from its lock file ("pid 123 on host since ...")."""
    return {r: int(lock_path(out, r).read_text().split()[1]) for r in range(RANKS)}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; its parent has not reaped it yet


def manifest(out: Path, rank: int) -> dict:
    return manifest_state(out, rank)


def cpu_slot(rank: int) -> str:
    """A CPU rank's cores: an equal block each, or one each round-robin when there are fewer
    cores than ranks (this 2-core machine: 0, 1, 0, 1)."""
    cores = sorted(os.sched_getaffinity(0))
    per = len(cores) // RANKS
    mine = [cores[rank % len(cores)]] if per == 0 else cores[rank * per : (rank + 1) * per]
    return f"CPU core{'s' if len(mine) > 1 else ''} {','.join(map(str, mine))}"


# --- the whole output of a run ------------------------------------------------------------------

MASKS = [
    (re.compile(r"^(\[rank \d\] )?\d\d:\d\d:\d\d "), r"\1HH:MM:SS "),
    (re.compile(r"pid \d+"), "pid N"),
    (re.compile(r"\b(\d+h)?(\d+m)?\d+s\b"), "Ds"),
    (re.compile(r"[\d,]+\.\d output tok/s"), "R output tok/s"),
]


def masked(output: str) -> list[str]:
    lines = []
    for line in output.splitlines():
        for pattern, replacement in MASKS:
            line = pattern.sub(replacement, line)
        lines.append(line)
    return lines


def test_four_ranks_write_every_row_once_as_one_process_does(src, tmp_path, reference):
    out = tmp_path / "out"
    result = run_cli(*args(src, out, "--data-parallel", "4", "--progress-seconds", "3600"))
    assert texts(out) == reference
    table = read_output(out)

    lines = masked(result.output)
    launcher = [line for line in lines if not line.startswith("[rank ")]
    assert launcher[:5] == [
        f"HH:MM:SS batchgen: --data-parallel: 4 ranks of {out}, each in its own process",
        *(
            f"HH:MM:SS batchgen: rank {r} of 4: pid N on {cpu_slot(r)}, 1 GiB KV cache"
            for r in range(4)
        ),
    ]
    assert sorted(launcher[5:9]) == [f"HH:MM:SS batchgen: rank {r} of 4 finished" for r in range(4)]
    assert launcher[9:] == [
        "HH:MM:SS batchgen: finished: 4 ranks | 400 prompts this run (400 rows, 0 errors) | "
        "3,200 output tokens | generate Ds, wall Ds | R output tok/s",
        f"HH:MM:SS batchgen: output: 400 prompts committed of 400 in 40 shard(s) of 4 rank(s) "
        f"under {out}",
    ]
    for r in range(RANKS):
        mine = [line for line in lines if line.startswith(f"[rank {r}] ")]
        ids = {f"q{i:03d}" for i in range(r * PER_RANK, (r + 1) * PER_RANK)}
        tokens = zip(table["id"].to_pylist(), table["prompt_tokens"].to_pylist(), strict=True)
        prompt_tokens = sum(t for i, t in tokens if i in ids)
        assert mine == [
            f"[rank {r}] HH:MM:SS batchgen: finished: 100 prompts this run (100 rows, 0 errors) | "
            f"{prompt_tokens:,} prompt + 800 output tokens | generate Ds, engine start Ds, "
            "wall Ds | R output tok/s | finish reasons: length 100",
            f"[rank {r}] HH:MM:SS batchgen: output: 100 prompts committed of 100 in 10 shard(s) "
            f"under {out}",
        ]
    assert len(lines) == len(launcher) + 2 * RANKS


# --- signals and deaths --------------------------------------------------------------------------


def test_sigterm_reaches_every_rank_exit_75_and_a_rerun_completes(src, tmp_path, reference):
    out, log = tmp_path / "out", tmp_path / "log"
    proc = start(args(src, out, "--data-parallel", "4", *SLOW_FLAGS), log, SLOW)
    wait_until(lambda: every_rank_committed(out), proc, log, "a shard from every rank")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, log.read_text()

    lines = masked(log.read_text())
    assert (
        "HH:MM:SS batchgen: SIGTERM received: passed on to rank(s) 0, 1, 2, 3, which finish "
        "their running requests, commit and exit 75; ranks not started yet stay so; rerun the "
        "same command to resume"
    ) in lines
    for r in range(RANKS):
        assert (
            f"[rank {r}] HH:MM:SS batchgen: SIGTERM received: finishing running requests (up to "
            "Ds), committing, then exiting with code 75; rerun the same command to resume"
        ) in lines
        assert f"HH:MM:SS batchgen: rank {r} of 4 interrupted (exit 75)" in lines
        assert manifest(out, r)["status"] == "interrupted"
        assert manifest(out, r)["report"]["signal"] == "SIGTERM"
    partial = read_output(out).num_rows
    assert RANKS * 10 <= partial < ROWS
    assert lines[-2].startswith("HH:MM:SS batchgen: interrupted: 4 ranks | ")
    assert lines[-1] == (
        f"HH:MM:SS batchgen: output: {partial:,} prompts committed of 400 in "
        f"{len(list(out.glob('rank-*/part-*.parquet')))} shard(s) of 4 rank(s) under {out}"
    )

    result = run_cli(*args(src, out, "--data-parallel", "4"))
    for r in range(RANKS):
        assert re.search(
            rf"^\[rank {r}\] \d\d:\d\d:\d\d batchgen: resuming rank {r}: \d+ prompts already "
            r"committed in \d+ shard\(s\)$",
            result.output,
            re.MULTILINE,
        ), result.output
    assert texts(out) == reference


def test_a_killed_rank_fails_the_run_naming_it_and_a_rerun_on_fewer_slots_redoes_it(
    src, tmp_path, reference
):
    out, log = tmp_path / "out", tmp_path / "log"
    env = {**SLOW, "BATCHGEN_TEST_GRANDCHILD": "2"}
    proc = start(args(src, out, "--data-parallel", "4", *SLOW_FLAGS), log, env)
    wait_until(lambda: every_rank_committed(out), proc, log, "a shard from every rank")
    os.kill(rank_pids(out)[2], signal.SIGKILL)
    assert proc.wait(timeout=180) == 1, log.read_text()

    output = log.read_text()
    grandchild = int(re.search(r"^\[rank 2\] BATCHGEN_TEST_GRANDCHILD pid (\d+)$", output, re.M)[1])
    assert not alive(grandchild), "the killed rank's child (vLLM's engine core) runs on"
    lines = masked(output)
    assert "HH:MM:SS batchgen: rank 2 of 4 was killed by SIGKILL" in lines
    assert "HH:MM:SS batchgen: stopped the processes rank 2 left behind (vLLM's engine)" in lines
    for r in (0, 1, 3):
        assert f"HH:MM:SS batchgen: rank {r} of 4 finished" in lines
    assert output.endswith(
        f"Error: rank 2 of 4 was killed by SIGKILL: BATCHGEN_TEST_GRANDCHILD pid {grandchild}\n"
        "rank(s) 0, 1, 3 finished; rerun the same command to resume: finished ranks do nothing, "
        "and rank(s) 2 redo only what they had not committed\n"
    )
    status = run_cli("status", out, "--json", expect=3)
    states = [r["state"] for r in json.loads(status.output)["ranks"]]
    assert states == ["finished", "finished", "crashed", "finished"]

    # Two slots for a run of four ranks: how a run is finished on fewer GPUs than it began on.
    result = run_cli(*args(src, out, "--num-ranks", "4", "--data-parallel", "2"))
    assert f"batchgen: --data-parallel: 4 ranks of {out}, 2 at a time" in result.output
    for r in (0, 1, 3):
        assert f"[rank {r}] " in result.output
        assert re.search(rf"^\[rank {r}\] .* already complete: 100 rows", result.output, re.M)
    assert re.search(r"^\[rank 2\] .* resuming rank 2: \d+ prompts", result.output, re.M)
    assert texts(out) == reference


def test_a_killed_launcher_leaves_no_rank_running(src, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    proc = start(args(src, out, "--data-parallel", "4", *SLOW_FLAGS), log, SLOW)
    wait_until(lambda: every_rank_committed(out), proc, log, "a shard from every rank")
    pids = rank_pids(out)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids.values()):
        assert time.monotonic() < deadline, f"ranks still running: {pids}\n{log.read_text()}"
        time.sleep(0.1)
    for r in range(RANKS):  # each was told (SIGTERM), committed and recorded it
        assert manifest(out, r)["status"] == "interrupted"
        assert manifest(out, r)["report"]["signal"] == "SIGTERM"


def test_a_signal_while_the_engine_starts_stops_the_run_with_75(src, tmp_path):
    """Before generation begins (here: in the engine's start), a stop signal unwinds the start:
    the default action would kill the process and leave vLLM's engine processes orphaned."""
    out, log = tmp_path / "out", tmp_path / "log"
    proc = start(args(src, out), log, {"BATCHGEN_TEST_PAUSE": "engine_start"})
    wait_until(lambda: "engine_start" in log.read_text(), proc, log, "the engine's start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75, log.read_text()
    assert masked(log.read_text())[-1] == (
        "HH:MM:SS batchgen: SIGTERM received before generation began: stopped; nothing was "
        "generating, exiting with code 75; rerun the same command to resume"
    )
    assert manifest(out, 0)["status"] == "interrupted"
    assert manifest(out, 0)["report"]["signal"] == "SIGTERM"


# --- flags ---------------------------------------------------------------------------------------

# (extra flags, extra environment, the exact error line).
REFUSALS = [
    pytest.param(
        ["--data-parallel", "2", "--num-ranks", "4", "--rank", "1"],
        {},
        "--data-parallel 2 starts every rank itself; drop --rank (--num-ranks N alone "
        "with --data-parallel runs the N ranks, that many at a time)",
        id="with-shard-index",
    ),
    pytest.param(
        ["--data-parallel", "2"],
        {"RANK": "1", "WORLD_SIZE": "2"},
        "--data-parallel 2 starts its own ranks, but torchrun (RANK=1, WORLD_SIZE=2) already "
        "made this process rank 1 of 2; drop --data-parallel and let the launcher start the "
        "ranks, or start batchgen outside the launcher",
        id="under-torchrun",
    ),
    pytest.param(
        ["--data-parallel", "auto"],
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"},
        "--data-parallel auto starts its own ranks, but srun (SLURM_PROCID=0, SLURM_NTASKS=4) "
        "already made this process rank 0 of 4; drop --data-parallel and let the launcher start "
        "the ranks, or start batchgen outside the launcher",
        id="auto-under-srun",
    ),
    pytest.param(
        ["--data-parallel", "3", "--num-shards", "2"],
        {},
        "--data-parallel 3 with --num-ranks 2: a run of 2 ranks runs at most 2 at once; pass "
        "--data-parallel 2 or less",
        id="more-slots-than-ranks",
    ),
    pytest.param(
        ["--data-parallel", "3"],
        {"CUDA_VISIBLE_DEVICES": "0,1"},
        "--data-parallel 3 x --tensor-parallel-size 1 needs 3 GPUs, but 2 are visible (0,1); "
        "pass --data-parallel 2 or auto",
        id="too-few-gpus",
    ),
    pytest.param(
        ["--data-parallel", "2", "--tensor-parallel-size", "2"],
        {"CUDA_VISIBLE_DEVICES": "4,5,6"},
        "--data-parallel 2 x --tensor-parallel-size 2 needs 4 GPUs, but 3 are visible (4,5,6); "
        "pass --data-parallel 1 or auto",
        id="too-few-gpus-for-tensor-parallel",
    ),
    pytest.param(
        ["--data-parallel", "0"],
        {},
        "Invalid value for '--data-parallel': 0: must be at least 1 (or auto)",
        id="zero",
    ),
    pytest.param(
        ["--data-parallel", "two"],
        {},
        "Invalid value for '--data-parallel': 'two': expected a number of ranks, e.g. 4, or auto",
        id="not-a-number",
    ),
]


@pytest.mark.parametrize("extra, env, message", REFUSALS)
def test_data_parallel_flag_conflicts_are_usage_errors(
    src, tmp_path, monkeypatch, extra, env, message
):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = run_cli(*args(src, tmp_path / "out", *extra), expect=2)
    assert result.output.endswith(f"\nError: {message}\n"), result.output
    assert not (tmp_path / "out").exists()


def test_ranks_that_all_refuse_their_input_alike_are_one_usage_error(src, tmp_path):
    out = tmp_path / "out"
    cmd = run_args(src, out, "--data-parallel", "2", *FAKE_ENGINE)
    cmd[cmd.index("--prompt-column") + 1] = "promt"
    result = run_cli(*cmd, expect=2)
    assert result.output.endswith(
        "Error: ranks 0, 1 of 2 failed (exit 2): --prompt-column 'promt': no such column (did "
        "you mean 'prompt'?); the input's columns are: prompt, id\n"
        "fix what they name, then rerun\n"
    ), result.output


def test_a_rerun_with_another_rank_count_is_refused_naming_the_ways_out(src, tmp_path):
    out = tmp_path / "out"
    run_cli(*args(src, out, "--num-shards", "4", "--shard-index", "0"))
    result = run_cli(*args(src, out, "--data-parallel", "2"), expect=1)
    assert result.output.endswith(
        f"Error: {out} holds a run of 4 rank(s), and this would be a run of 2:\n"
        "  num_shards: 4 -> 2\n"
        "rerun with --data-parallel 4 to resume it, or with --num-ranks 4 --data-parallel 2 to "
        "run its 4 ranks 2 at a time on fewer GPUs; pass --overwrite to start afresh, or choose "
        "another --output\n"
    )


def test_data_parallel_1_and_auto_on_cpu_are_a_plain_run(src, tmp_path):
    for value in ("1", "auto"):
        out = tmp_path / value
        result = run_cli(*args(src, out, "--data-parallel", value))
        assert "[rank" not in result.output and "--data-parallel:" not in result.output
        assert manifest(out, 0)["num_ranks"] == 1
        assert read_output(out).num_rows == ROWS


def test_ranks_get_this_commands_settings_from_the_command_line_and_the_config(tmp_path, src):
    config = tmp_path / "job.toml"
    config.write_text(
        f'parquet = "{src}"\nprompt-column = "prompt"\nchat = true\ntemperature = 0.7\n'
        'stop = ["--", "\\n\\n"]\nengine-arg = ["enable_prefix_caching=false"]\n'
        "data-parallel = 4\nrows-per-shard = 7\n"
    )
    given = ["--config", str(config), "--max-tokens", "9", "--no-enforce-eager", "-vv"]
    given += ["--keep-prompt", "--output", str(tmp_path / "out"), "--overwrite"]
    ctx = run.make_context("run", given)
    flags = rank_flags(ctx)
    assert flags == [
        f"--parquet={src}",
        "--prompt-column=prompt",
        "--chat",
        "--no-enforce-eager",
        "--engine-arg=enable_prefix_caching=false",
        "--max-tokens=9",
        "--temperature=0.7",
        "--stop=--",
        "--stop=\n\n",
        f"--output={tmp_path / 'out'}",
        "--rows-per-shard=7",
        "--keep-prompt",
        "--verbose",
        "--verbose",
    ]
    rank_ctx = run.make_context("run", [*flags, "--num-ranks", "4", "--rank", "1"])
    expected = run_config(dict(ctx.params, num_ranks=4, rank=1, overwrite=False))
    assert run_config(dict(rank_ctx.params)) == expected


# --- the slot plan -------------------------------------------------------------------------------

# (--data-parallel, --num-shards, --tensor-parallel-size, environment, CPUs) -> (ranks, slots).
PLANS = [
    pytest.param(
        4,
        None,
        1,
        {"CUDA_VISIBLE_DEVICES": ""},
        [0, 1],
        (4, ["CPU core 0", "CPU core 1", "CPU core 0", "CPU core 1"]),
        id="cpu-more-ranks-than-cores",
    ),
    pytest.param(
        2,
        None,
        1,
        {"CUDA_VISIBLE_DEVICES": "", "VLLM_CPU_KVCACHE_SPACE": "8"},
        list(range(8)),
        (2, ["CPU cores 0,1,2,3, 4 GiB KV cache", "CPU cores 4,5,6,7, 4 GiB KV cache"]),
        id="cpu-blocks-and-kv-share",
    ),
    pytest.param(
        "auto",
        None,
        1,
        {"CUDA_VISIBLE_DEVICES": ""},
        [0, 1],
        (1, ["all CPU cores, 2 GiB KV cache"]),
        id="auto-on-cpu",
    ),
    pytest.param(
        "auto",
        None,
        2,
        {"CUDA_VISIBLE_DEVICES": "2,3,5,7,9"},
        [0],
        (2, ["GPU 2,3", "GPU 5,7"]),
        id="auto-tensor-parallel-pairs",
    ),
    pytest.param(
        "auto",
        3,
        1,
        {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"},
        [0],
        (3, ["GPU 0", "GPU 1", "GPU 2"]),
        id="auto-capped-by-num-shards",
    ),
    pytest.param(
        2,
        8,
        1,
        {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b,GPU-c"},
        [0],
        (8, ["GPU GPU-a", "GPU GPU-b"]),
        id="eight-ranks-two-at-a-time",
    ),
]


@pytest.mark.parametrize("data_parallel, num_shards, tp, env, cpus, expected", PLANS)
def test_slot_plan(data_parallel, num_shards, tp, env, cpus, expected):
    plan = plan_node(data_parallel, num_shards, tp, {"VLLM_CPU_KVCACHE_SPACE": "2", **env}, cpus)
    where = [s.where for s in plan.slots]
    if expected[1][0].startswith("CPU core"):
        where = [w.removesuffix(", 1 GiB KV cache") for w in where]
    assert (plan.num_ranks, where) == expected
    for slot in plan.slots:
        if slot.where.startswith("GPU"):
            assert slot.env == {"CUDA_VISIBLE_DEVICES": slot.where.removeprefix("GPU ")}
        elif slot.cpus is not None:
            assert slot.env["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, slot.cpus))


def test_kv_cache_space_that_is_not_a_number_is_refused():
    with pytest.raises(ConfigError) as exc:
        plan_node(2, None, 1, {"CUDA_VISIBLE_DEVICES": "", "VLLM_CPU_KVCACHE_SPACE": "4G"}, [0])
    assert str(exc.value) == (
        "VLLM_CPU_KVCACHE_SPACE='4G': expected whole GiB, e.g. 4 (--data-parallel gives each "
        "rank an equal share)"
    )


# --- the combined progress line ------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def snapshot(todo, prompts, tokens, elapsed, done_before=0, errors=0, final=False) -> dict:
    return {
        "todo": todo,
        "done_before": done_before,
        "prompts": prompts,
        "rows": prompts,
        "errors": errors,
        "completion_tokens": tokens,
        "elapsed": elapsed,
        "final": final,
    }


def test_the_progress_line_sums_the_ranks():
    progress = NodeProgress(4, stream=io.StringIO(), interval=1)
    t0 = progress.started
    for r in (0, 1, 2):
        progress.rank_started(r)
    progress.update(0, snapshot(100, 50, 400, 10.0))
    progress.update(1, snapshot(100, 25, 200, 10.0, done_before=20, errors=3))
    progress.rank_ended(2, finished_prompts=80)  # already complete: it sent nothing
    assert progress._line(t0 + 20) == (
        "175 prompts | 2 of 4 ranks running, 1 ended, 1 waiting | 60 out tok/s | 3 errors | "
        "elapsed 20s"
    )
    progress.rank_started(3)
    progress.update(3, snapshot(100, 0, 0, 0.5))
    # The total once every rank has told its own; 225 to go at 5 + 2.5 + 0 prompts/s.
    assert progress._line(t0 + 20) == (
        "175/400 prompts (43.8%) | 3 of 4 ranks running, 1 ended | 60 out tok/s | 3 errors | "
        "ETA 30s | elapsed 20s"
    )
    progress.update(0, snapshot(100, 100, 800, 12.0, final=True))  # done, exiting: no rate
    assert progress._line(t0 + 20) == (
        "225/400 prompts (56.2%) | 3 of 4 ranks running, 1 ended | 20 out tok/s | 3 errors | "
        "ETA 1m10s | elapsed 20s"
    )
    assert progress.totals()["prompts"] == 125 and progress.totals()["errors"] == 3


def test_log_lines_go_above_the_live_progress_line():
    terminal = Terminal()
    progress = NodeProgress(2, stream=terminal, interval=0)
    progress.rank_started(0)
    progress.tick()
    line = "batchgen: starting the ranks | 1 of 2 ranks running, 1 waiting | elapsed 0s"
    progress.log("[rank 0] hello")
    progress.close()
    blank = " " * len(line)
    assert terminal.getvalue() == f"\r{line}\r{blank}\r[rank 0] hello\n{line}\n"


def test_a_rank_sends_json_snapshots_instead_of_a_line(tmp_path):
    from pipeline.progress import Progress
    from pipeline.records import ResultRow

    read_end, write_end = os.pipe()
    stream = io.StringIO()
    progress = Progress(3, 7, stream=stream, report_fd=write_end)
    progress.add([ResultRow("a", 0, 0, "x", "length", 4, 5)])
    progress.close()
    os.close(write_end)
    with open(read_end) as channel:
        sent = [json.loads(line) for line in channel]
    assert stream.getvalue() == ""
    for s in sent:
        assert s.pop("elapsed") >= 0
    assert sent[0] == {
        "todo": 3,
        "done_before": 7,
        "prompts": 0,
        "rows": 0,
        "errors": 0,
        "completion_tokens": 0,
        "final": False,
    }
    assert sent[-1] == {**sent[0], "prompts": 1, "rows": 1, "completion_tokens": 5, "final": True}


# --- the launchers' job files --------------------------------------------------------------------

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def test_torchrun_job_runs_one_rank_per_process(src, tmp_path, reference):
    """jobs/torchrun/node.sh with two CPU processes: ranks 0 and 1 of 2, from RANK/WORLD_SIZE."""
    config = tmp_path / "job.toml"
    config.write_text(
        f'parquet = "{src}"\nprompt-column = "prompt"\nid-column = "id"\nmax-tokens = 8\n'
        f'engine = "fake"\nrows-per-shard = 10\noutput = "{tmp_path / "out"}"\n'
    )
    env = {**os.environ, "NPROC_PER_NODE": "2", "BATCHGEN": str(HOOKED_BATCHGEN)}
    env["TORCHRUN"] = str(Path(sys.executable).with_name("torchrun"))
    env["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    proc = subprocess.run(
        [JOBS / "torchrun" / "node.sh", config],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert texts(tmp_path / "out") == reference
    assert [manifest(tmp_path / "out", r)["num_ranks"] for r in (0, 1)] == [2, 2]


def test_kubernetes_indexed_job_numbers_its_pods_as_ranks(monkeypatch):
    yaml = pytest.importorskip("yaml")
    job = yaml.safe_load((JOBS / "k8s" / "indexed-job.yaml").read_text())
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert spec["completionMode"] == "Indexed"
    assert int(env["BATCHGEN_NUM_RANKS"]) == spec["completions"]
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] > 30  # --drain-seconds, then the commit
    assert container["command"][:2] == ["batchgen", "run"]
    monkeypatch.chdir(JOBS.parent)  # the image's workingDir holds this repository
    ctx = run.make_context("run", container["command"][2:])
    for index in range(spec["completions"]):
        pod_env = {**env, "JOB_COMPLETION_INDEX": str(index)}
        rank = resolve_rank(ctx.params["num_ranks"], ctx.params["rank"], pod_env)
        assert (rank.rank, rank.num_ranks) == (index, spec["completions"])
