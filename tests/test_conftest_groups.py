"""The worker split that `make test` relies on (tests/conftest.py): real-engine and Slurm tests
one after another on one pytest-xdist worker, the object-store files on one. Twice it silently
stopped: the groups were added after xdist's worker had read them (hook order), and pytest 9.2
stopped reading the field xdist marks them in (pytest-dev/pytest-xdist#1386). Either way every
test still passed alone, and the engine tests ran beside each other."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO

# Tests of an object-store file that need no server: a second or two in all.
S3_FAST = "settings_follow or unknown_scheme or local_paths_resolve or credentials_stay_out"


def test_an_object_store_files_tests_run_as_one_group_on_one_worker():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v",
         "-p", "no:cacheprovider", "tests/test_storage.py", "-k", S3_FAST],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = re.findall(r"\[(gw\d)\] \[ *\d+%\] PASSED (\S+)", proc.stdout)
    assert len(ran) == 4, proc.stdout[-3000:]
    assert all(test.endswith("@s3") for _, test in ran), ran
    assert len({worker for worker, _ in ran}) == 1, ran


# Prints each collected test's group as the conftest hook set it.
SHOW_GROUPS = """
import sys, pytest
class Show:
    def pytest_collection_finish(self, session):
        for item in session.items:
            mark = item.get_closest_marker("xdist_group")
            print("GROUP", item.nodeid.split("::")[-1], mark.args[0] if mark else "-")
sys.exit(pytest.main(["--co", "-q", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[Show()]))
"""


def test_engine_tests_share_one_group_and_the_other_slurm_tests_have_their_own():
    """The real engine's tests (the Slurm one among them) run one after another on one worker;
    the fake-engine Slurm tests one after another as a group of their own, which the other
    worker takes: the serial worker is the longer one, so they were 103 s of its time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(
        [sys.executable, "-c", SHOW_GROUPS, "tests/test_slurm.py", "tests/test_plan_engine.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    groups = dict(re.findall(r"^GROUP (\S+) (\S+)$", proc.stdout, re.M))
    assert groups["test_usr1_requeues_in_a_row_on_the_real_engine_never_drain_the_node"] == (
        "serial"
    )
    assert groups["test_array_job_writes_the_input_exactly_once"] == "slurm"
    assert groups["test_usr1_requeues_a_task_a_cancel_does_not_and_rerunning_it_finishes"] == (
        "slurm"
    )
    plan = [g for name, g in groups.items() if name.startswith("test_calibrated_eta")]
    assert plan == ["serial"], groups
