"""The project's own Slurm job files on a real single-node Slurm cluster (jobs/slurm/local-cluster.sh),
with the fake engine: an array writes its input exactly once, a task signalled the way Slurm
signals ahead of a time limit commits, exits 75 and is requeued (or resubmitted) and resumes,
and the one-node job runs one rank per task.

Jobs are watched with `squeue` every second and judged by Slurm's completion log, one line per
finished (or requeued) task, which gives every task's state and exit code. (`sbatch --wait`
returns the highest of them too, but polls with growing pauses: a 3-task array that ran for
16 s returned after about 40 s.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import HOOKED_BATCHGEN, REPO, manifest_state, read_output

from pipeline.engines import close_engines
from pipeline.sources import rank_range

pytestmark = pytest.mark.slurm

CLUSTER = REPO / "jobs" / "slurm" / "local-cluster.sh"
ARRAY_JOB = REPO / "jobs" / "slurm" / "batchgen.sbatch"
NODE_JOB = REPO / "jobs" / "slurm" / "multi-gpu.sbatch"
JOBCOMP_LOG = Path("/var/log/slurm/jobcomp.log")
ROWS = 60
TASKS = 3
# Slow enough that a signal lands mid-run: one row per step, so a 20-row rank takes 10 s.
SLOW = {"BATCHGEN_FAKE_STEP_SECONDS": "0.5"}
SLOW_FLAGS = ["--max-num-seqs", "1"]


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The local cluster, started (and installed) once; left running for the next session."""
    if os.geteuid() != 0:
        pytest.skip("needs root to install and start Slurm (jobs/slurm/local-cluster.sh)")
    if shutil.which("apt-get") is None:
        pytest.skip("needs apt-get to install slurm-wlm and munge (Debian/Ubuntu)")
    proc = subprocess.run(
        ["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"local-cluster.sh start failed:\n{proc.stderr[-4000:]}"


@pytest.fixture
def job_env() -> dict[str, str]:
    """The environment sbatch passes to the job (sbatch's default --export=ALL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("BATCHGEN_FAKE_STEP_SECONDS", None)
    env["BATCHGEN"] = str(HOOKED_BATCHGEN)  # batchgen with the tests' hooks (tests/hooks.py)
    return env


@pytest.fixture
def config(tmp_path: Path, slurm_cluster: None) -> Path:
    """A job config over ROWS prompts with ids row-000..., fake engine, output in tmp_path/out."""
    src = tmp_path / "prompts.parquet"
    ids = [f"row-{i:03d}" for i in range(ROWS)]
    prompts = [f"Question {i}: what is {i} times {i}?" for i in range(ROWS)]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), src, row_group_size=16)
    path = tmp_path / "job.toml"
    path.write_text(
        f'parquet = "{src}"\n'
        'prompt-column = "prompt"\n'
        'id-column = "id"\n'
        "max-tokens = 8\n"
        'engine = "fake"\n'
        f'output = "{tmp_path / "out"}"\n'
        "rows-per-shard = 4\n"
    )
    return path


_submitted: list[str] = []


@pytest.fixture(autouse=True)
def no_job_outlives_its_test():
    """A test that fails while its job still runs cancels it, so the job does not hold the
    node's CPUs (and its memory) under the tests that come next. No-op for ended jobs."""
    yield
    if _submitted:
        subprocess.run(["scancel", *_submitted], capture_output=True, timeout=30)
        _submitted.clear()


def sbatch(*args: str | Path, cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(
        ["sbatch", "--parsable", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    _submitted.append(job)
    return job


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    explain: Callable[[], str] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{explain()}")
        time.sleep(0.2)


def job_story(job_id: str, log: Path) -> str:
    """What a timed-out wait on a job shows: the task's log, Slurm's view of the job and the
    controller's lines about it."""
    shown = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30
    ).stdout
    ctld = Path("/var/log/slurm/slurmctld.log")
    ctld_lines = (
        [line for line in ctld.read_text(errors="replace").splitlines() if job_id in line]
        if ctld.exists()
        else []
    )
    procs = subprocess.run(
        ["ps", "-eo", "pid,pgid,stat,etimes,args"], capture_output=True, text=True
    ).stdout
    return (
        f"--- {log.name} (tail)\n{log.read_text()[-4000:] if log.exists() else '(none)'}\n"
        f"--- scontrol show job {job_id}\n{shown}\n"
        f"--- slurmctld.log lines naming {job_id}\n" + "\n".join(ctld_lines[-40:]) + "\n"
        f"--- processes\n{procs[-6000:]}"
    )


def job_gone(job_id: str) -> bool:
    proc = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True)
    # An id Slurm has already forgotten is an error; either way nothing is queued or running.
    return proc.returncode != 0 or not proc.stdout.strip()


def wait_done(job_id: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not job_gone(job_id):
        assert time.monotonic() < deadline, subprocess.run(
            ["scontrol", "show", "job", job_id], capture_output=True, text=True
        ).stdout
        time.sleep(1)


def completions(job_id: str) -> dict[int, list[dict[str, str]]]:
    """Slurm's completion-log lines of a job, by array task id (0 for a plain job), in order."""
    found: dict[int, list[dict[str, str]]] = {}
    for line in JOBCOMP_LOG.read_text().splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("ArrayJobId") == job_id or (
            fields.get("JobId") == job_id and "ArrayJobId" not in fields
        ):
            found.setdefault(int(fields.get("ArrayTaskId", 0)), []).append(fields)
    return found


def final_states(job_id: str, tasks: int) -> dict[int, list[tuple[str, str]]]:
    """(JobState, ExitCode) of every completion-log line of each task, once all have ended."""

    def ended() -> bool:
        lines = completions(job_id)
        return len(lines) == tasks and all(
            t[-1]["JobState"] not in ("PENDING", "REQUEUED") for t in lines.values()
        )

    wait_until(ended, 15, f"completion-log lines of job {job_id}")
    return {
        task: [(f["JobState"], f["ExitCode"]) for f in lines]
        for task, lines in sorted(completions(job_id).items())
    }


def manifests(out: Path) -> dict[int, dict]:
    return {
        int(p.name.split("-")[1]): manifest_state(out, int(p.name.split("-")[1]))
        for p in sorted((out / ".batchgen").glob("rank-*"))
        if any(p.glob("manifest-*"))
    }


def assert_exactly_once(out: Path, rows: int = ROWS) -> pa.Table:
    table = read_output(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "a row was written twice"
    assert sorted(ids) == [f"row-{i:03d}" for i in range(rows)]
    return table


def assert_ranks_own_their_slices(out: Path, ranks: int, rows: int = ROWS) -> None:
    for rank in range(ranks):
        start, stop = rank_range(rows, ranks, rank)
        files = sorted(out.glob(f"rank-*/part-{rank:05d}-*.parquet"))
        ids = sorted(i for f in files for i in pq.read_table(f, columns=["id"])["id"].to_pylist())
        assert ids == [f"row-{i:03d}" for i in range(start, stop)], f"rank {rank}"


def shards_of(out: Path, rank: int) -> Callable[[], bool]:
    return lambda: any(out.glob(f"rank-*/part-{rank:05d}-*.parquet"))


def test_array_job_writes_the_input_exactly_once(tmp_path, config, job_env):
    job = sbatch(f"--array=0-{TASKS - 1}", ARRAY_JOB, config, cwd=tmp_path, env=job_env)
    wait_done(job)
    assert final_states(job, TASKS) == {t: [("COMPLETED", "0:0")] for t in range(TASKS)}

    out = tmp_path / "out"
    assert_exactly_once(out)
    assert_ranks_own_their_slices(out, TASKS)
    states = {r: (m["status"], m["num_ranks"]) for r, m in manifests(out).items()}
    assert states == {r: ("finished", TASKS) for r in range(TASKS)}
    for task in range(TASKS):
        log = (tmp_path / f"batchgen-{job}_{task}.log").read_text()
        expected_exe = job_env.get("BATCHGEN", str(REPO / ".venv" / "bin" / "batchgen"))
        assert f"task {job}_{task} restart 0 on " in log
        assert f": {expected_exe} run --config {config}" in log
        assert f"output: 20 prompts committed of 20 in 5 shard(s) under {out}" in log

    # Resubmitting the same command as is: every rank is already complete and leaves its files.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("rank-*/part-*.parquet")}
    again = sbatch(f"--array=0-{TASKS - 1}", ARRAY_JOB, config, cwd=tmp_path, env=job_env)
    wait_done(again)
    assert final_states(again, TASKS) == {t: [("COMPLETED", "0:0")] for t in range(TASKS)}
    for task in range(TASKS):
        log = (tmp_path / f"batchgen-{again}_{task}.log").read_text()
        assert (
            f"already complete: 20 rows (20 prompts, 0 errors) in 5 shard(s) of rank {task}" in log
        )
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("rank-*/part-*.parquet")} == before


def test_usr1_requeues_a_task_a_cancel_does_not_and_rerunning_it_finishes(
    tmp_path, config, job_env
):
    """USR1 is Slurm's warning ahead of a time limit (--signal=B:USR1@120): the task commits,
    exits 75 and requeues itself. A cancel also commits and exits 75 but stays cancelled;
    rerunning that one task (BATCHGEN_NUM_RANKS keeps it rank 2 of 3) finishes the run."""
    out = tmp_path / "out"
    job = sbatch(
        f"--array=0-{TASKS - 1}",
        ARRAY_JOB,
        config,
        *SLOW_FLAGS,
        cwd=tmp_path,
        env={**job_env, **SLOW},
    )
    wait_until(shards_of(out, 1), 120, "task 1's first shard")
    # What Slurm does ahead of a time limit: signal the batch shell alone.
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_1"], check=True)
    # Task 2 starts once task 1's CPU is free (the test cluster may have only two).
    wait_until(shards_of(out, 2), 120, "task 2's first shard")
    subprocess.run(["scancel", f"{job}_2"], check=True)
    wait_done(job)

    states = final_states(job, TASKS)
    assert states[0] == [("COMPLETED", "0:0")]
    assert states[1][0][0] in ("PENDING", "REQUEUED")  # how this Slurm logs the requeue
    assert states[1][1:] == [("COMPLETED", "0:0")]
    assert [state for state, _ in states[2]] == ["CANCELLED"]  # and not requeued

    log = (tmp_path / f"batchgen-{job}_1.log").read_text()
    assert "SIGUSR1 received; passing it on to batchgen" in log
    assert "batchgen: SIGUSR1 received: finishing running requests" in log
    committed = int(re.search(r"output: (\d+) prompts committed of 20 ", log).group(1))
    assert 0 < committed < 20
    assert f"batchgen was interrupted (exit 75); requeueing {job}_1 to resume it" in log
    assert f"task {job}_1 restart 1 on " in log
    assert f"resuming rank 1: {committed} prompts already committed" in log
    assert "batchgen: SIGTERM received" in (tmp_path / f"batchgen-{job}_2.log").read_text()

    done = manifests(out)
    assert [done[r]["status"] for r in range(TASKS)] == ["finished", "finished", "interrupted"]
    assert done[1]["report"]["this_run"]["prompts"] == 20 - committed
    cancelled_at = done[2]["report"]["committed"]["prompts"]
    assert 0 < cancelled_at < 20

    # Rerun the cancelled rank alone: task id 2 as rank 2 of the run's 3.
    again = sbatch(
        "--array=2", ARRAY_JOB, config, cwd=tmp_path, env={**job_env, "BATCHGEN_NUM_RANKS": "3"}
    )
    wait_done(again)
    assert final_states(again, 1) == {2: [("COMPLETED", "0:0")]}
    log = (tmp_path / f"batchgen-{again}_2.log").read_text()
    assert f"--config {config} --num-ranks 3 --rank 2" in log
    assert f"resuming rank 2: {cancelled_at} prompts already committed" in log
    assert_exactly_once(out)
    assert_ranks_own_their_slices(out, TASKS)
    assert {r: m["status"] for r, m in manifests(out).items()} == dict.fromkeys(
        range(TASKS), "finished"
    )


def test_one_node_job_runs_one_rank_per_task_on_its_own_gpu(tmp_path, config, job_env):
    # With --gres=gpu:2 every task would see both GPUs; the job file gives each its own.
    env = {**job_env, "CUDA_VISIBLE_DEVICES": "0,1"}
    job = sbatch("--ntasks-per-node=2", NODE_JOB, config, cwd=tmp_path, env=env)
    wait_done(job)

    assert final_states(job, 1) == {0: [("COMPLETED", "0:0")]}
    log = (tmp_path / f"batchgen-node-{job}.log").read_text()
    for rank in range(2):
        assert re.search(
            rf"^{rank}: \[multi-gpu.sbatch\] rank {rank} of 2 on .*: CUDA_VISIBLE_DEVICES={rank}$",
            log,
            re.M,
        ), log
    out = tmp_path / "out"
    assert_exactly_once(out)
    assert_ranks_own_their_slices(out, 2)
    states = {r: (m["status"], m["num_ranks"]) for r, m in manifests(out).items()}
    assert states == {0: ("finished", 2), 1: ("finished", 2)}


def node_states() -> str:
    return subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30
    ).stdout.strip()


REQUEUES = 2


@pytest.fixture
def engines_closed() -> None:
    """The two tasks' engines need the memory that this process's cached engines (earlier
    tests') hold: a CPU engine reserves its KV cache up front and refuses to start, naming the
    free memory, when the machine has too little (it did beside the other pytest worker)."""
    close_engines()


@pytest.mark.engine
@pytest.mark.other_engine  # closes this process's engines for the two tasks' own
def test_usr1_requeues_in_a_row_on_the_real_engine_never_drain_the_node(
    tmp_path, slurm_cluster, job_env, engines_closed
):
    """A held-out check once drained the node: after a USR1 requeue on the real engine, Slurm
    logged "JOB NOT ENDING WITH SIGNALS" and set the node to DRAIN. Two USR1 requeues in a row
    of one task of a 2-task array, the second once the restarted task has committed a new shard:
    each time the task commits, exits 75 and comes back, the node never leaves service, and the
    run ends with every row exactly once. (Two, not more: each requeue is an engine start, and
    the second is already a requeue of a requeued task.)"""
    src = tmp_path / "prompts.parquet"
    # 12 rows a task: each run commits a shard of 2 and drains the 2 running before its
    # requeue, so the last run still has rows to do; more would only lengthen the last run.
    rows = 24
    ids = [f"row-{i:03d}" for i in range(rows)]
    prompts = [f"Write a long story about the number {i}." for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), src)
    config = tmp_path / "job.toml"
    out = tmp_path / "out"
    config.write_text(
        f'parquet = "{src}"\n'
        'prompt-column = "prompt"\n'
        'id-column = "id"\n'
        "chat = true\n"
        "max-tokens = 32\n"
        "temperature = 0\n"
        'dtype = "float32"\n'
        "max-model-len = 512\n"
        "max-num-seqs = 2\n"  # slow enough that every signal lands mid-run
        f'output = "{out}"\n'
        "rows-per-shard = 2\n"
    )
    env = {**job_env, "BATCHGEN": str(REPO / ".venv" / "bin" / "batchgen")}
    job = sbatch("--array=0-1", ARRAY_JOB, config, cwd=tmp_path, env=env)
    log = tmp_path / f"batchgen-{job}_0.log"
    seen_states: set[str] = set()

    last_look = [0.0]

    def watch(check: Callable[[], bool]) -> Callable[[], bool]:
        def watched() -> bool:
            # A drained node stays drained until resumed: a look a second is enough (sinfo
            # five times a second was load beside the tasks' engines).
            if time.monotonic() - last_look[0] >= 1:
                seen_states.update(node_states().split())
                last_look[0] = time.monotonic()
            return check()

        return watched

    def shard_count() -> int:
        return len(list(out.glob("rank-*/part-00000-*.parquet")))

    def story() -> str:
        return f"node states seen: {sorted(seen_states)}\n{job_story(job, log)}"

    try:
        for restart in range(REQUEUES):
            started = f"task {job}_0 restart {restart} on "
            wait_until(
                watch(lambda s=started: log.exists() and s in log.read_text()),
                300,
                started,
                story,
            )
            before = shard_count()
            wait_until(
                watch(lambda n=before: shard_count() > n),
                300,
                f"a shard of restart {restart}",
                story,
            )
            subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_0"], check=True)
            wait_until(
                watch(lambda r=restart: f"task {job}_0 restart {r + 1} on " in log.read_text()),
                300,
                f"restart {restart + 1}",
                story,
            )
        wait_until(watch(lambda: job_gone(job)), 600, f"job {job} to end", story)
    finally:
        if any("drain" in s for s in seen_states | set(node_states().split())):
            # Leave the cluster usable for the next tests, then fail below.
            subprocess.run(
                [
                    "scontrol",
                    "update",
                    f"nodename={os.uname().nodename.split('.')[0]}",
                    "state=resume",
                ],
                check=False,
            )
    assert not any("drain" in s for s in seen_states), (seen_states, log.read_text()[-3000:])

    states = final_states(job, 2)
    assert states[1] == [("COMPLETED", "0:0")]
    assert states[0][-1] == ("COMPLETED", "0:0")
    assert len(states[0]) == REQUEUES + 1, states  # the requeues, then done
    text = log.read_text()
    assert text.count("batchgen was interrupted (exit 75); requeueing") == REQUEUES
    assert "still running in this job" not in text
    assert "outlived SIGKILL" not in text
    assert_exactly_once(out, rows)
    assert_ranks_own_their_slices(out, 2, rows)
