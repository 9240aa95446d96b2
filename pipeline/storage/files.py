"""Input files on a store: a URL naming one object, a prefix (read recursively) or a glob
(`s3://bucket/data/*.parquet`, `**` for any depth), and a retrying random-access reader, so a
Parquet file is read by byte ranges (its footer, then row groups) and never whole."""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline.errors import ConfigError
from pipeline.storage.ranged import RangedFile
from pipeline.storage.resolve import Location
from pipeline.storage.retry import RetryPolicy, with_retries


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One input object: its path in the filesystem, its size, its name relative to the root."""

    path: str
    size: int
    name: str


def expand(spec: str, suffix: str, flag: str) -> tuple[Location, list[RemoteFile]]:
    """The objects a URL names, sorted by path; ConfigError in one line when there are none.
    A prefix is read recursively, skipping names whose parts start with '.' or '_' (as
    datasets and Spark do), and keeps only names ending in `suffix`."""
    from pipeline.storage.preflight import preflight  # one-line answers for bucket/credentials

    loc = preflight(spec, write=False, flag=flag)
    fs, path = loc.fs, loc.path.rstrip("/")
    policy = RetryPolicy(deadline_s=60)
    if glob.has_magic(path):
        base = _static_prefix(path)
        pattern = _glob_regex(path)
        infos = _listing(fs, base, policy)
        # As a local glob: '*' does not match a leading '.' (temporary and hidden files).
        found = [i for i in infos if pattern.fullmatch(i.path) and not i.base_name.startswith(".")]
        what = "matches no object"
    else:
        info = with_retries(f"{flag} {spec}", lambda: fs.get_file_info(path), policy)
        if info.type == pafs.FileType.File:
            base, found = path.rsplit("/", 1)[0], [info]
        else:
            base = path
            found = [i for i in _listing(fs, path, policy) if i.path.endswith(suffix)]
            found = [i for i in found if not _hidden(i.path[len(base) + 1 :])]
        what = f"holds no {suffix} object" if info.type != pafs.FileType.File else ""
    if not found:
        raise ConfigError(
            f"{flag} {spec}: {what or 'no such object'}; give an object, a prefix or a glob"
        )
    files = [RemoteFile(i.path, i.size, i.path[len(base) + 1 :] or i.base_name) for i in found]
    return loc, sorted(files, key=lambda f: f.path)


def _listing(fs: pafs.FileSystem, base: str, policy: RetryPolicy) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    infos = with_retries(f"listing {base}", lambda: fs.get_file_info(selector), policy)
    return [i for i in infos if i.type == pafs.FileType.File]


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _static_prefix(pattern: str) -> str:
    parts = []
    for part in pattern.split("/"):
        if glob.has_magic(part):
            break
        parts.append(part)
    return "/".join(parts)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as a regex over '/'-separated paths: `*` and `?` stay within one part, `**`
    spans any number of parts."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            out.append("[" + pattern[i + 1 : end].replace("!", "^", 1) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


class RetryingReader(RangedFile):
    """A random-access reader of one object whose reads are retried (reopening at the same
    offset) on transient errors: a store that restarts mid-read costs a pause, not the run."""

    def __init__(
        self, fs: pafs.FileSystem, path: str, size: int, policy: RetryPolicy | None = None
    ):
        super().__init__(size)
        self.fs, self.path = fs, path
        self.policy = policy or RetryPolicy()
        self._f = None

    def _read_at(self, offset: int, n: int) -> bytes:
        def go() -> bytes:
            try:
                if self._f is None:
                    self._f = self.fs.open_input_file(self.path)
                return self._f.read_at(n, offset)
            except Exception:
                self._f = None  # reopen on the next try
                raise

        return with_retries(f"reading {self.path}", go, self.policy)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        super().close()
