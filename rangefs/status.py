"""What `rangefs status` and `rangefs cache clear` know of a cache directory, with or without a mount.

The report (``report``) has the shape `rangefs status --json` prints. A running daemon builds it
from its files in memory (rangefs.control); without one, ``offline_files`` builds it from the
state files, read only: nothing in a cache directory that no mount uses is created or changed.
The URL of each cached file is the one its state file records (``state.Identity.url``, redacted
when saved). The lists' paths are not on disk: without a mount, a file's path is the name its URL
gives (the last segment of its path, as a URL list line without a path names it).

``drop_files`` removes one URL's cache files, the state first, so that no state file ever claims
data that is gone; ``mount_lock`` is how a clear without a mount knows that none uses the
directory. Imports rangefs.state, checksums' reader (through DataFile), safefs and redact; never
trio or pyfuse3. Everything here blocks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from rangefs import safefs, state
from rangefs.bitmap import Bitmap
from rangefs.datafile import DataFile
from rangefs.errors import UsageError
from rangefs.redact import redact_url

# Held shared by every daemon serving a mount from the cache directory, for its whole life (the
# kernel drops it when the process dies, even by kill -9); a clear without a mount takes it
# exclusively, so neither can start while the other runs.
LOCK_NAME = "mount.lock"
STATE_SUFFIX = ".state"
_MAX_LISTED = 100_000  # state files listed at most: a status must stay bounded in a huge directory


class InUse(Exception):
    """A cache file is locked by a rangefs process (a mount has it open)."""


def file_entry(*, path: str | None, url: str, size: int, cached_bytes: int, state_name: str,
               error: str | None) -> dict[str, Any]:
    """One file of the report; ``url`` is redacted again here, whatever the caller passed."""
    return {"path": path, "url": redact_url(url), "size": size, "cached_bytes": cached_bytes,
            "complete": cached_bytes == size and state_name != "error", "state": state_name, "error": error}


def report(*, mountpoint: str | None, cache_dir: Path, max_bytes: int | None, min_free_bytes: int,
           allocated: int, files: list[dict[str, Any]]) -> dict[str, Any]:
    return {"mountpoint": mountpoint, "cache_dir": str(cache_dir),
            "cache": {"allocated_bytes": allocated, "max_bytes": max_bytes, "min_free_bytes": min_free_bytes},
            "files": files}


def filesystem_bytes(cache_dir: Path) -> int:
    """The size of the filesystem holding the cache directory (for --cache-min-free's percentage)."""
    st = os.statvfs(cache_dir)
    return st.f_blocks * st.f_frsize


def allocated_bytes(cache_dir: Path) -> int:
    """What ``du`` counts of ``cache_dir``: the allocated bytes of everything under it, each
    inode once, never following a symbolic link (blocking). The evictor's count too."""
    total, seen = 0, set()
    paths: Iterator[str] = (os.path.join(top, name) for top, dirs, files in os.walk(cache_dir)
                            for name in (*dirs, *files))  # os.walk lists a link to a directory, never enters it
    for path in (str(cache_dir), *paths):
        try:
            st = os.lstat(path)
        except OSError:  # removed meanwhile
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def check_cache_dir(cache_dir: Path) -> None:
    """Raise UsageError unless ``cache_dir`` is an existing directory (nothing is created)."""
    try:
        st = os.stat(cache_dir)
    except FileNotFoundError:
        raise UsageError(f"cache directory '{cache_dir}' does not exist") from None
    except OSError as exc:
        raise UsageError(f"cache directory '{cache_dir}': {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"cache directory '{cache_dir}' is not a directory")


def state_keys(cache_dir: Path) -> list[str]:
    """The keys of the URLs that have a state file, sorted."""
    try:
        names = os.listdir(cache_dir / safefs.FILES)
    except FileNotFoundError:
        return []  # a cache directory nothing was cached in yet
    except OSError as exc:
        raise UsageError(f"cache directory '{cache_dir}': {exc.strerror}") from None
    return sorted(name.removesuffix(STATE_SUFFIX) for name in names[:_MAX_LISTED] if name.endswith(STATE_SUFFIX))


def cache_keys(cache_dir: Path) -> list[str]:
    """The keys of every URL with any cache file (state, data or sums), sorted; temp files aside."""
    try:
        names = os.listdir(cache_dir / safefs.FILES)[:_MAX_LISTED]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UsageError(f"cache directory '{cache_dir}': {exc.strerror}") from None
    keys = {name.split(".", 1)[0] for name in names
            if name.endswith((".data", STATE_SUFFIX, STATE_SUFFIX + ".prev", ".xxh"))}
    return sorted(keys)


def url_of(files_dir: Path, key: str) -> str:
    """The URL a key's state file records (redacted), or the key when it has none to trust."""
    try:
        return redact_url(state.read(DataFile(files_dir, key).state_path).identity.url)
    except (OSError, state.StateCorrupt):
        return key


def bytes_in(identity: state.Identity, bitmap: Bitmap | None) -> int:
    """Bytes in the blocks of ``bitmap``, the file's last block counting only its real length."""
    if bitmap is None or identity.nblocks == 0:
        return 0
    tail_short = identity.block_size * identity.nblocks - identity.size
    return len(bitmap) * identity.block_size - (tail_short if identity.nblocks - 1 in bitmap else 0)


def offline_files(cache_dir: Path) -> list[dict[str, Any]]:
    """The report's files from the state files alone: complete or partial (what was saved last)."""
    files: list[dict[str, Any]] = []
    for key in state_keys(cache_dir):
        data = DataFile(cache_dir / safefs.FILES, key)
        try:
            # Opening a name rangefs did not make removes it (safefs): look without opening first.
            foreign = _foreign((data.state_path, state.previous(data.state_path), data.sums_path))
            if foreign is not None:
                raise state.StateCorrupt(f"{foreign.name} was not made by rangefs (a mount removes it)")
            saved = state.read(data.state_path)
        except (OSError, state.StateCorrupt) as exc:
            files.append(file_entry(path=f"{safefs.FILES}/{data.state_path.name}", url="", size=0, cached_bytes=0,
                                    state_name="error",
                                    error=f"state file {data.state_path.name} not trusted: {exc}"))
            continue
        identity, cached = saved.identity, 0
        try:
            whole = safefs.lstat(data.path).st_size == identity.size
        except OSError:
            whole = False
        if whole:  # as a mount would load it: only blocks whose sum is on disk
            cached = bytes_in(identity, data.with_sums(saved.bitmap)[0])
        files.append(file_entry(path=_name_of(identity.url), url=identity.url, size=identity.size, cached_bytes=cached,
                                state_name="complete" if cached == identity.size else "partial", error=None))
    return files


def _name_of(url: str) -> str:
    """The file name a URL gives (its path's last segment, decoded), else the URL, redacted."""
    name = unquote(urlsplit(url).path.rpartition("/")[2])
    return name if name and name not in (".", "..") and "\x00" not in name else redact_url(url)


def _foreign(paths: tuple[Path, ...]) -> Path | None:
    """The first of ``paths`` that is something rangefs does not make (a link, a FIFO, a file with
    another name), seen without opening it."""
    for path in paths:
        try:
            st = safefs.lstat(path)
        except FileNotFoundError:
            continue
        if not (stat.S_ISREG(st.st_mode) and st.st_nlink <= 1):
            return path
    return None


def drop_files(files_dir: Path, key: str) -> int:
    """Remove one URL's cache files unless a rangefs process has them open; the bytes freed.

    The state goes first: a crash half way leaves data no state claims, never a state that
    claims data that is gone. The data file is unlinked, never truncated or punched: a mapping
    of it (which outlives its handle) keeps reading what it mapped.

    Raises:
        InUse: a rangefs process holds the data file's lock.
    """
    data = DataFile(files_dir, key)
    freed, fd = 0, -1
    try:
        fd = safefs.open(data.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    if fd >= 0:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InUse(key) from None
    try:
        for path in (data.state_path, state.previous(data.state_path), data.sums_path, data.path):
            try:
                freed += safefs.lstat(path).st_blocks * 512
            except OSError:
                pass
        state.remove(data.state_path)
        safefs.unlink(data.sums_path)
        if fd >= 0 and os.fstat(fd).st_ino == safefs.lstat(data.path).st_ino:
            safefs.unlink(data.path)
    finally:
        if fd >= 0:
            os.close(fd)
    return freed


def mount_lock(cache_dir: Path, *, exclusive: bool) -> int:
    """Take the cache directory's mount lock (shared: a daemon; exclusive: a clear without a
    mount) without waiting; the descriptor holding it.

    Raises:
        InUse: the other kind holds it.
        OSError: the lock file cannot be opened.
    """
    fd = safefs.open(cache_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise InUse(str(cache_dir)) from None
        raise
    return fd


# -- the table ------------------------------------------------------------------------------


def human(size: int | None) -> str:
    """A byte count in binary units, as `ls -lh` prints it."""
    if size is None:
        return "none"
    value = float(size)
    for unit in ("", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{int(value)}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _percent(part: int, whole: int) -> str:
    return f"{100 * part // whole}%" if whole else "100%"


def table(status: dict[str, Any]) -> str:
    """The report as the text `rangefs status` prints."""
    files = status["files"]
    rows = [("PATH" if status["mountpoint"] else "URL", "SIZE", "CACHED", "%", "STATE")]
    for f in files:
        name = f["path"] if f["path"] is not None else f["url"]
        state_text = f["state"] + (f": {f['error']}" if f["state"] == "error" and f["error"] else "")
        rows.append((name, human(f["size"]), human(f["cached_bytes"]), _percent(f["cached_bytes"], f["size"]),
                     state_text))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}  {row[4]}"
             for row in rows]
    size = sum(f["size"] for f in files)
    cached = sum(f["cached_bytes"] for f in files)
    cache = status["cache"]
    lines.append(f"{len(files)} file{'s' * (len(files) != 1)}, {human(size)}, {human(cached)} cached "
                 f"({_percent(cached, size)})")
    where = f"{status['cache_dir']}" + (f" (mounted at {status['mountpoint']})" if status["mountpoint"] else "")
    lines.append(f"cache {where}: {human(cache['allocated_bytes'])} allocated, limit {human(cache['max_bytes'])}, "
                 f"keeps {human(cache['min_free_bytes'])} free")
    return "\n".join(lines)
