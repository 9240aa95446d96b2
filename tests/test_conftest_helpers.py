"""conftest.py's Group, which the stop tests of bench and tune use: a command that goes silent
without exiting fails the test at its deadline instead of hanging it, and the lines read before
the signal stay in the command's stderr."""

from __future__ import annotations

import sys
import time

import pytest
from conftest import Group

SILENT = "import sys, time; sys.stderr.write('begun\\npart'); sys.stderr.flush(); time.sleep(60)"


def test_signal_at_fails_at_its_deadline_when_the_command_goes_silent() -> None:
    with Group([sys.executable, "-c", SILENT]) as group:
        started = time.monotonic()
        with pytest.raises(AssertionError, match=r"begun\n\s*part"):
            group.signal_at("never printed", 2)
        assert time.monotonic() - started < 5


def test_the_lines_read_before_the_signal_stay_in_stderr() -> None:
    script = "import sys, time; print('one', file=sys.stderr, flush=True); time.sleep(60)"
    with Group([sys.executable, "-c", script]) as group:
        group.signal_at("one", 30)
        code, out, err = group.finish(30)
    assert code == -15 and out == "" and err == "one\n"
