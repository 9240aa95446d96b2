"""A run refused for its flags or input (a usage error, exit 2) leaves nothing behind.

The output folder is made, and the rank locked, before the run is read and the engine started;
a usage error found then would otherwise leave a lock, a manifest and an engine log that make
`batchgen status` call the folder incomplete (exit 3, which a cron wrapper reads as "resubmit").
`RankFootprint` notes what of one rank's state existed before the run and removes what the run
added, only that rank's files: other ranks of the same folder may be starting at the same time.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from pipeline.checkpoint import STATE_DIR, engine_log_path, manifest_path
from pipeline.errors import ConfigError
from pipeline.rankstate import job_path, state_ranks
from pipeline.sources.listing import LISTING_GLOB
from pipeline.storage.outpath import is_store


def check_output_path(out_dir: Path) -> None:
    """Refuse an --output that is, or lies under, an existing file (ConfigError)."""
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if path.is_dir():
                return
            where = "is a file" if path == out_dir else f"lies under {path}, which is a file"
            raise ConfigError(
                f"--output {out_dir} {where}, not a folder: batchgen writes a folder of Parquet "
                f"shards there; choose a folder path that is new or a folder "
                f"(e.g. --output {out_dir.with_suffix('')}-out)"
            )


class RankFootprint:
    """What one rank's run adds to its output folder before generation begins."""

    def __init__(self, out_dir: Path, rank: int) -> None:
        self.out_dir = out_dir
        self.rank = rank
        # The rank's state folder (lock, manifest generations, commit records) is its own.
        self.new_state = (
            None if manifest_path(out_dir, rank).exists() else manifest_path(out_dir, rank)
        )
        self.new_files = [p for p in (engine_log_path(out_dir, rank),) if not p.exists()]
        self.new_job_record = not job_path(out_dir).exists()
        state = out_dir / STATE_DIR
        self.listings = set(state.glob(LISTING_GLOB))  # the input listings kept before it
        # Emptied folders are removed innermost first, and only if this run made them.
        self.new_dirs = [d for d in (state / "logs", state, out_dir) if not d.exists()]

    def _new_listings(self) -> list[Path]:
        return sorted(set((self.out_dir / STATE_DIR).glob(LISTING_GLOB)) - self.listings)

    def remove(self) -> None:
        """Remove what the run added (called once it is refused, its lock released)."""
        if is_store(self.new_state):  # no folders on a store: its objects, one by one
            for path in self.new_state.iterdir():
                path.unlink()
        elif self.new_state is not None:
            shutil.rmtree(self.new_state, ignore_errors=True)
        for path in self.new_files:
            with contextlib.suppress(OSError):
                path.unlink()
        if self.new_job_record and not [r for r in state_ranks(self.out_dir) if r != self.rank]:
            # Written by this run, and no other rank began.
            for path in [job_path(self.out_dir), *self._new_listings()]:
                with contextlib.suppress(OSError):
                    path.unlink()
        for folder in self.new_dirs:
            with contextlib.suppress(OSError):  # not empty: another rank is writing there
                folder.rmdir()
