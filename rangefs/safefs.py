"""Every file rangefs creates, opens, replaces or removes in its cache directory goes through here.

rangefs runs as root; a symbolic link planted in its cache directory must not make it write,
truncate or read a file elsewhere. So names are resolved relative to directory descriptors,
never through a symbolic link:

- ``open_cache_dir`` creates the cache directory (0700) and ``files/`` in it (0700), opens both
  once and refuses them unless they belong to this user and no group or other user may write
  them. The path the user gave may pass through symbolic links (it is theirs to name); the
  directory it leads to is what is checked. ``files/`` itself must not be a link.
- Each cache file is opened relative to its directory's descriptor with O_NOFOLLOW, and only if
  it is a regular file with no other name. A name that is anything else (a symbolic link, a
  hard link of another file, a FIFO, a device) was not made by rangefs: the name is removed
  (never what it points to), a warning is logged, and the file counts as missing, so that URL's
  cache starts afresh, as with a corrupt state file.
- Temp files have unpredictable names and are created with O_EXCL.
- The log is opened with O_NOFOLLOW|O_APPEND, mode 0600.

A directory not opened by ``open_cache_dir`` in this process (the fetch helper, unit tests) is
opened for each call: its parent by path, the directory itself with O_NOFOLLOW.
Imports only the standard library and rangefs.errors.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from rangefs.errors import CacheError

log = logging.getLogger(__name__)

FILES = "files"  # the cache directory's subdirectory of per-URL files
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_TEMP_BYTES = 8
# Temp names, and those of rangefs before temp_path (".tmp" and a pid; ".data-new").
_TEMP_NAME = re.compile(rf".+\.(tmp[0-9a-f]{{{2 * _TEMP_BYTES}}}|tmp[0-9]+|data-new)")
# Directories checked and opened by open_cache_dir, by path: written before any thread starts
# (at mount), read by every thread after; kept open for the process's life.
_dirs: dict[Path, int] = {}


def open_cache_dir(cache_dir: Path) -> None:
    """Create, check and open the cache directory and its ``files/``.

    Raises:
        CacheError: one of them belongs to another user, may be written by others, or
            ``files/`` is not a directory of its own.
        OSError: they cannot be created or opened.
    """
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    root = os.open(cache_dir, _DIR_FLAGS)  # follows a link in the user's own path (see above)
    try:
        _check_dir(root, f"cache directory '{cache_dir}'")
        with contextlib.suppress(FileExistsError):
            os.mkdir(FILES, 0o700, dir_fd=root)
        if stat.S_ISLNK(os.stat(FILES, dir_fd=root, follow_symlinks=False).st_mode):
            raise CacheError(f"cache directory '{cache_dir}': '{FILES}' is a symbolic link; refusing it")
        files = os.open(FILES, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=root)
    except BaseException:
        os.close(root)
        raise
    try:
        _check_dir(files, f"cache directory '{cache_dir / FILES}'")
    except BaseException:
        os.close(files)
        os.close(root)
        raise
    for path, fd in ((cache_dir, root), (cache_dir / FILES, files)):
        old = _dirs.pop(path, None)
        _dirs[path] = fd
        if old is not None:
            os.close(old)


def _check_dir(fd: int, what: str) -> None:
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        raise CacheError(f"{what} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}); refusing it")
    if st.st_mode & 0o022:
        raise CacheError(f"{what} may be written by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                         "refusing it (chmod go-w)")


def _parent(path: Path) -> contextlib.AbstractContextManager[int]:
    """A descriptor of ``path``'s directory (see ``_directory``)."""
    return _directory(path.parent)


@contextlib.contextmanager
def _directory(directory: Path) -> Iterator[int]:
    """A descriptor of ``directory``: the one open_cache_dir opened, else one opened now."""
    fd = _dirs.get(directory)
    if fd is not None:
        yield fd
        return
    parent = os.open(directory.parent, _DIR_FLAGS)
    try:
        fd = os.open(directory.name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
    finally:
        os.close(parent)
    try:
        yield fd
    finally:
        os.close(fd)


def directory(directory: Path) -> contextlib.AbstractContextManager[int]:
    """A descriptor of a cache directory (or ``files/``), never reached through a symbolic link."""
    return _directory(directory)


def _own_file(st: os.stat_result) -> bool:
    """A regular file with no other name: what rangefs makes."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink <= 1


def _clear_foreign(dir_fd: int, path: Path) -> None:
    """Remove ``path``'s name if it is something rangefs did not make (directories are left to fail)."""
    try:
        st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if _own_file(st) or stat.S_ISDIR(st.st_mode):
        return
    kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else (
        "a hard link of another file" if stat.S_ISREG(st.st_mode) else "not a regular file")
    log.warning("%s was %s, not made by rangefs: removed it (not what it points to)", path, kind)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path.name, dir_fd=dir_fd)


def _open_at(dir_fd: int, path: Path, flags: int, mode: int) -> int:
    _clear_foreign(dir_fd, path)
    # O_NONBLOCK: should a FIFO appear after the check, the open must not wait for a writer.
    fd = os.open(path.name, flags | _NOFOLLOW | os.O_NONBLOCK, mode, dir_fd=dir_fd)
    try:
        if not _own_file(os.fstat(fd)):
            raise OSError(errno.ELOOP, f"not a regular file of rangefs's own: {path}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` of a cache file, never through a symbolic link (see the module docstring)."""
    with _parent(path) as dir_fd:
        return _open_at(dir_fd, path, flags, mode)


def read_bytes(path: Path) -> bytes:
    """The whole content of a cache file.

    Raises:
        FileNotFoundError: there is none (or there was something rangefs did not make).
    """
    fd = open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def lstat(path: Path) -> os.stat_result:
    """``os.stat`` of a cache file's name itself (a link is not followed)."""
    with _parent(path) as dir_fd:
        return os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)


def exists(path: Path) -> bool:
    try:
        lstat(path)
    except FileNotFoundError:
        return False
    return True


def unlink(path: Path) -> None:
    """Remove a cache file's name (if there is one; a link goes, never what it points to)."""
    with _parent(path) as dir_fd, contextlib.suppress(FileNotFoundError):
        os.unlink(path.name, dir_fd=dir_fd)


def replace(source: Path, target: Path) -> None:
    """``os.replace`` of one cache file by another (a link at ``target`` is replaced, not followed)."""
    with _parent(source) as source_dir, _parent(target) as target_dir:
        os.replace(source.name, target.name, src_dir_fd=source_dir, dst_dir_fd=target_dir)


def temp_path(path: Path) -> Path:
    """A name beside ``path`` that no one can guess: open it with O_CREAT|O_EXCL."""
    return path.with_name(f"{path.name}.tmp{secrets.token_hex(_TEMP_BYTES)}")


def remove_stale_temps(directory: Path, min_age: float) -> int:
    """Remove temp files (``temp_path``) left by a crash: those unchanged for ``min_age`` seconds,
    since another mount sharing the cache directory may be writing a young one. Their number."""
    removed = 0
    with _directory(directory) as dir_fd:
        for name in os.listdir(dir_fd):
            if _TEMP_NAME.fullmatch(name) is None:
                continue
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime >= min_age:
                    os.unlink(name, dir_fd=dir_fd)
                    removed += 1
    return removed


def open_log(path: Path) -> int:
    """The log file, for appending; created 0600, never through a symbolic link.

    In the cache directory it is a cache file like the others; a log file elsewhere (the user's
    --log-file), or one this process did not open the cache directory for (the fetch helper),
    that is a symbolic or hard link is refused (ELOOP), not removed: that directory is theirs.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    if path.parent in _dirs:
        fd = open(path, flags)
    else:
        fd = os.open(path, flags | _NOFOLLOW, 0o600)
    st = os.fstat(fd)
    if not _own_file(st):  # a hard link (or FIFO) would append to another file
        os.close(fd)
        raise OSError(errno.ELOOP, "not a regular file of its own (a hard link?)")
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077:
        os.fchmod(fd, 0o600)  # a log from before it was made private
    return fd


class LogHandler(logging.StreamHandler[TextIO]):
    """``logging.FileHandler`` for a log opened by ``open_log``."""

    def __init__(self, path: Path) -> None:
        super().__init__(os.fdopen(open_log(path), "a", encoding="utf-8"))

    def close(self) -> None:
        self.acquire()
        try:
            self.flush()
            self.stream.close()
        finally:
            self.release()
        super().close()
