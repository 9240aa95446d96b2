"""The job files without a cluster: example configs are valid `batchgen run` configs, the shell
scripts parse (and pass shellcheck where it is installed), the Slurm scripts refuse bad calls,
run batchgen when started by hand and pass a signal on to it, and the one-node job gives each
task its own GPUs. (On a real Slurm: test_slurm.py.)"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BATCHGEN, HOOKED_BATCHGEN, REPO, read_output

from pipeline.cli.flags import run_config
from pipeline.cli.run import run

JOBS = REPO / "jobs"
EXAMPLES = sorted((JOBS / "examples").glob("*.toml"))
# Every script under jobs/ (a new one is checked without being listed here).
SCRIPTS = sorted(p for p in JOBS.rglob("*") if p.suffix in (".sh", ".sbatch"))
ARRAY_JOB = JOBS / "slurm" / "batchgen.sbatch"
NODE_JOB = JOBS / "slurm" / "multi-gpu.sbatch"


@pytest.fixture
def env() -> dict[str, str]:
    """The environment outside any Slurm job."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    clean["BATCHGEN"] = str(HOOKED_BATCHGEN)
    clean.pop("BATCHGEN_FAKE_STEP_SECONDS", None)
    return clean


def test_every_job_script_is_checked():
    assert {p.relative_to(JOBS).as_posix() for p in SCRIPTS} >= {
        "slurm/batchgen.sbatch",
        "slurm/multi-gpu.sbatch",
        "slurm/local-cluster.sh",
        "cron/nightly.sh",
        "torchrun/node.sh",
    }


def test_there_are_example_configs():
    assert {p.name for p in EXAMPLES} >= {"sample.toml", "summarize.toml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_a_valid_run_config(path: Path):
    """Every key is a flag, and the flags together pass RunConfig's validation."""
    ctx = run.make_context("run", ["--config", str(path)])
    params = dict(ctx.params, num_ranks=1, rank=0)
    cfg = run_config(params)
    assert cfg.output.path.startswith("out/")


def test_sample_config_runs_the_bundled_sample(tmp_path: Path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [BATCHGEN, "run", "--config", JOBS / "examples" / "sample.toml"]
        + ["--engine", "fake", "--output", out],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    table = read_output(out)
    source = pq.read_table(REPO / "data" / "prompts.parquet")
    assert sorted(table.column("id").to_pylist()) == sorted(source.column("id").to_pylist())
    assert table.column_names[-1] == "category"
    assert len(list(out.glob("rank-*/part-00000-*.parquet"))) == 6  # rows-per-shard = 8 of 48


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(path: Path):
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(path: Path):
    proc = subprocess.run(["shellcheck", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize(
    "script, args, extra_env, message",
    [
        (ARRAY_JOB, [], {}, "usage: sbatch [sbatch options] "),
        (ARRAY_JOB, ["--num-shards"], {}, "usage: sbatch [sbatch options] "),
        (ARRAY_JOB, ["missing.toml"], {}, "config missing.toml: no such readable file"),
        (
            ARRAY_JOB,
            ["SAMPLE"],
            {"BATCHGEN": "/nonexistent/batchgen"},
            "batchgen executable /nonexistent/batchgen not found; set BATCHGEN",
        ),
        (NODE_JOB, [], {}, "usage: sbatch --ntasks-per-node=GPUS "),
        (NODE_JOB, ["SAMPLE"], {}, "run this with sbatch (it starts its ranks with srun)"),
        (
            NODE_JOB,
            ["SAMPLE"],
            {"SLURM_ARRAY_JOB_ID": "7", "SLURM_JOB_ID": "8"},
            "this is a one-node job and not an array",
        ),
    ],
)
def test_slurm_script_refuses_a_bad_call(tmp_path, env, script, args, extra_env, message):
    args = [str(JOBS / "examples" / "sample.toml") if a == "SAMPLE" else a for a in args]
    proc = subprocess.run(
        ["bash", script, *args],
        cwd=tmp_path,
        env={**env, **extra_env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert message in proc.stderr


@pytest.fixture
def slow_config(tmp_path: Path) -> Path:
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"Question {i}?" for i in range(40)]}), src)
    path = tmp_path / "job.toml"
    path.write_text(
        f'parquet = "{src}"\nprompt-column = "prompt"\nmax-tokens = 8\nengine = "fake"\n'
        f'output = "{tmp_path / "out"}"\nrows-per-shard = 4\nmax-num-seqs = 1\n'
    )
    return path


def test_array_script_by_hand_passes_a_signal_on_and_keeps_exit_75(tmp_path, env, slow_config):
    """Outside Slurm the script just runs batchgen; USR1 to the script reaches batchgen, which
    commits and exits 75, and the script exits 75 too (no requeue without a job)."""
    proc = subprocess.Popen(
        ["bash", ARRAY_JOB, slow_config],
        cwd=tmp_path,
        env={**env, "BATCHGEN_FAKE_STEP_SECONDS": "0.2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out = tmp_path / "out"
    deadline = time.monotonic() + 60
    while not list(out.glob("rank-*/part-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "task (not under Slurm) restart 0" in err
    assert "SIGUSR1 received; passing it on to batchgen (pid " in err
    assert "batchgen: SIGUSR1 received: finishing running requests" in err
    assert "requeue" not in err
    assert 0 < read_output(out).num_rows < 40


def pick_gpus_snippet() -> str:
    """The per-task GPU selection that multi-gpu.sbatch runs before batchgen."""
    text = NODE_JOB.read_text()
    match = re.search(r"^pick_gpus='\n(.*?)^'$", text, re.S | re.M)
    assert match, "multi-gpu.sbatch has no pick_gpus='...' block"
    return match.group(1)


@pytest.mark.parametrize(
    "visible, tasks, local_id, expected",
    [
        ("0,1,2,3", 4, 2, "2"),  # --gres=gpu:4, 4 tasks: each its own
        ("0,1,2,3,4,5,6,7", 2, 1, "4,5,6,7"),  # 2 tensor-parallel replicas of 4
        ("3", 4, 1, "3"),  # --gpus-per-task=1: Slurm already chose
        ("0,1,2,3", 1, 0, "0,1,2,3"),  # one task, tensor parallel over all
        ("0,1,2", 2, 1, "0,1,2"),  # uneven: left as Slurm set it
        ("", 2, 1, ""),  # a CPU node
    ],
)
def test_one_node_job_gives_each_task_its_share_of_gpus(env, visible, tasks, local_id, expected):
    task_env = {
        **env,
        "CUDA_VISIBLE_DEVICES": visible,
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_LOCALID": str(local_id),
        "SLURM_PROCID": str(local_id),
        "SLURM_NTASKS": str(tasks),
    }
    proc = subprocess.run(
        [
            "bash",
            "-c",
            pick_gpus_snippet(),
            "batchgen-rank",
            "bash",
            "-c",
            'echo "${CUDA_VISIBLE_DEVICES-}"',
        ],
        env=task_env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected
    assert f"rank {local_id} of {tasks} on " in proc.stderr
