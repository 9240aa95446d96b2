"""Errors a user can act on, the process exit codes batchgen promises, and the wording of
storage failures (what failed, what is safe, what to do)."""

from __future__ import annotations

import errno
from pathlib import Path

# Exit codes, documented in the README and docs/resume.md; cron and Slurm job files branch on
# them. 1 is a ClickException (a problem that needs a person: bad input, engine crash, full
# disk) and 2 a usage error, both click's own.
EXIT_OK = 0
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal, committed what was done; rerun to resume
# `batchgen status` only (0 there means every rank finished, 1 that OUT holds no readable run):
EXIT_STATUS_INCOMPLETE = 3  # a rank is running, interrupted, crashed or not started
EXIT_STATUS_FAILED = 4  # a rank failed: fix the error it recorded, then rerun to resume


class BatchgenError(Exception):
    """A failure with a message that names the problem and the fix; shown without a traceback."""


class ConfigError(BatchgenError):
    """Flags or a config file that cannot work together; raised before any engine time is spent."""


class ResumeMismatch(BatchgenError):
    """The output directory holds a run whose settings differ from this one."""


class OutputLocked(BatchgenError):
    """Another live process is writing the same output directory and rank."""


_STORAGE_FAULTS = {
    errno.ENOSPC: ("no space left on device", "free space on the disk holding {out}"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota for {out}"),
    errno.EROFS: ("read-only file system", "make {out} writable"),
    errno.EACCES: ("permission denied", "make {out} writable"),
    errno.EPERM: ("operation not permitted", "make {out} writable"),
}


def storage_reason(exc: OSError, out_dir: Path) -> tuple[str, str]:
    """(what the OS said, in words; the fix) for a failed write in the output folder."""
    reason, fix = _STORAGE_FAULTS.get(exc.errno, (exc.strerror or str(exc), "fix the cause"))
    return reason, fix.format(out=out_dir)


def committed_note(prompts: int, out_dir: Path) -> str:
    """What is safe after a failure."""
    return f"{prompts:,} prompts committed in {out_dir} are safe"


def storage_failure(action: str, exc: OSError, out_dir: Path, committed: str = "") -> str:
    """What failed in the output folder, why, what is safe, and the fix, in one message."""
    reason, fix = storage_reason(exc, out_dir)
    safe = f"; {committed}" if committed else ""
    return f"{action} failed: {reason}{safe}; {fix} and rerun the same command to resume"
