"""Errors a user can act on, and the process exit codes batchgen promises."""

# Exit codes, documented in the README; cron and Slurm job files branch on them.
EXIT_OK = 0
EXIT_FAILED = 1  # a problem that needs a person: bad input, engine crash, full disk
EXIT_USAGE = 2  # click's own code for a malformed command line
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


class Interrupted(BatchgenError):
    """A signal stopped the run after committing finished rows; rerunning resumes it."""
