"""`rangefs status`, `rangefs prefetch` and `rangefs cache clear`: the client side.

With a mount, each asks its daemon over the control channel (rangefs.control); without one,
status and clear work on the cache directory itself (rangefs.status). Paths name files inside a
mount (a directory: the files under it); the mount is the nearest one above them in the mount
table, and its daemon is found by the pid it names there (``rangefs:<pid>``) and the cache
directory its root names (the ``user.rangefs.cache_dir`` xattr). Errors are UsageError (one line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rangefs import kernel, status
from rangefs.cache import CacheConfig
from rangefs.control import Client, bounded
from rangefs.errors import UsageError
from rangefs.mount import daemon_pid, default_cache_dir

_FSTYPE = "fuse.rangefs"


def add_parsers(commands: Any) -> None:
    """The three commands' parsers, on the subparsers of the main one."""
    s = commands.add_parser("status", help="what is cached, per file",
                            description="Show each file's size, cached bytes and state, and the cache's use "
                                        "and limits.")
    s.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, nargs="?",
                   help="a rangefs mount (its daemon answers); without it, --cache-dir is read as saved")
    s.add_argument("--cache-dir", type=Path, metavar="DIR",
                   help="read this cache directory without a mount (default: the default cache directory)")
    s.add_argument("--json", action="store_true", help="print JSON")

    p = commands.add_parser("prefetch", help="fetch whole files into the cache",
                            description="Have the daemon fetch whole files into the cache, in the background, "
                                        "behind the reads of applications. Ctrl-C stops waiting, not the fetching.")
    p.add_argument("paths", metavar="PATH", type=Path, nargs="+", help="files (or directories) in a rangefs mount")
    p.add_argument("--no-wait", action="store_true", help="return once started")

    c = commands.add_parser("cache", help="manage the cache", description="Manage the cache.")
    cache_commands = c.add_subparsers(dest="cache_command", metavar="COMMAND", required=True,
                                      parser_class=type(c))
    clear = cache_commands.add_parser("clear", help="drop cached data of files that are not open",
                                      description="Drop the cached data of files that are not open (open ones are "
                                                  "skipped and named).")
    clear.add_argument("paths", metavar="PATH", type=Path, nargs="*",
                       help="a rangefs mount, or files (or directories) in one (default: every file of --cache-dir)")
    clear.add_argument("--cache-dir", type=Path, metavar="DIR",
                       help="clear this cache directory, used by no mount (default: the default cache directory)")


def run(args: argparse.Namespace) -> int:
    if args.command == "status":
        return _status(args)
    if args.command == "prefetch":
        return _prefetch(args)
    return _clear(args)


def find_mount_of(path: Path) -> tuple[Path, int, str]:
    """The rangefs mount holding ``path``: its mount point, its daemon's pid, and ``path``
    relative to its root.

    Raises:
        UsageError: no such path, or it is not inside a rangefs mount.
    """
    absolute = Path(os.path.abspath(path))
    try:
        real = Path(bounded(absolute, lambda: os.path.realpath(absolute, strict=True)))
    except OSError as exc:
        raise UsageError(f"'{path}': {exc.strerror or 'no such file or directory'}") from None
    for candidate in (real, *real.parents):
        entry = kernel.find_mount(candidate)
        if entry is None:
            continue
        pid = daemon_pid(candidate)
        if entry.fstype != _FSTYPE or pid is None:
            break
        return candidate, pid, str(real.relative_to(candidate))
    raise UsageError(f"'{path}' is not in a rangefs mount")


def _one_mount(paths: list[Path]) -> tuple[Path, int, list[str]]:
    found = [find_mount_of(path) for path in paths]
    mountpoint, pid = found[0][0], found[0][1]
    for (other, _, _), path in zip(found, paths, strict=True):
        if other != mountpoint:
            raise UsageError(f"'{path}' is in another mount than '{paths[0]}': one mount per command")
    return mountpoint, pid, ["" if rel == "." else rel for _, _, rel in found]


def _offline_dir(cache_dir: Path | None) -> Path:
    """The cache directory, its links resolved: a mount follows a link to it (the path is the
    user's to name), and the cache files are then opened relative to the directory itself."""
    directory = (cache_dir or default_cache_dir()).absolute()
    status.check_cache_dir(directory)
    return Path(os.path.realpath(directory))


# -- status ---------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    if args.mountpoint is not None and args.cache_dir is not None:
        raise UsageError("give a MOUNTPOINT or --cache-dir, not both")
    if args.mountpoint is not None:
        mountpoint, pid, _ = find_mount_of(args.mountpoint)
        with Client(mountpoint, pid) as client:
            report: dict[str, Any] = client.ask({"op": "status"})["status"]
    else:
        report = offline_report(_offline_dir(args.cache_dir))
    print(json.dumps(report, indent=2) if args.json else status.table(report))
    return 0


def offline_report(cache_dir: Path) -> dict[str, Any]:
    """The status of a cache directory as saved; its limits are a mount's options, unknown here:
    no maximum, and the default free-space floor."""
    try:
        fs_bytes = status.filesystem_bytes(cache_dir)
    except OSError as exc:
        raise UsageError(f"cache directory '{cache_dir}': {exc.strerror}") from None
    return status.report(mountpoint=None, cache_dir=cache_dir, max_bytes=None,
                         min_free_bytes=CacheConfig(cache_dir).min_free_for(fs_bytes),
                         allocated=status.allocated_bytes(cache_dir), files=status.offline_files(cache_dir))


# -- prefetch -------------------------------------------------------------------------------


def _prefetch(args: argparse.Namespace) -> int:
    mountpoint, pid, rels = _one_mount(args.paths)
    wait = not args.no_wait
    with Client(mountpoint, pid) as client:
        client.send({"op": "prefetch", "paths": rels, "wait": wait})
        try:
            final = _follow(client, wait and sys.stdout.isatty())
        except KeyboardInterrupt:
            print(f"rangefs: stopped waiting; the daemon goes on prefetching ('rangefs status {mountpoint}' "
                  "shows it)", file=sys.stderr)
            return 130
    if not final.get("ok"):
        raise UsageError(f"prefetch: {final.get('error')}")
    files, total = final["files"], status.human(final["total"])
    if wait:
        print(f"prefetched {files} file{'s' * (files != 1)}, {total}: complete and saved")
    else:
        print(f"prefetching {files} file{'s' * (files != 1)}, {total}, in the background "
              f"('rangefs status {mountpoint}' shows progress)")
    return 0


def _follow(client: Client, bar: bool) -> dict[str, Any]:
    """Read the replies to the end, drawing the progress on a terminal; the final reply."""
    if not bar:
        return client.final()
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("prefetch"), BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(),
                  TimeRemainingColumn()) as progress:
        task = progress.add_task("prefetch", total=None)
        for reply in client.replies():
            counts = reply.get("progress") or reply
            if "total" in counts:
                progress.update(task, completed=counts["done"], total=counts["total"])
            if "ok" in reply:
                return reply
    raise AssertionError("replies end with a final reply")


# -- cache clear ----------------------------------------------------------------------------


def _clear(args: argparse.Namespace) -> int:
    if args.paths and args.cache_dir is not None:
        raise UsageError("give paths in a mount or --cache-dir, not both")
    if args.paths:
        mountpoint, pid, rels = _one_mount(args.paths)
        with Client(mountpoint, pid) as client:
            final = client.ask({"op": "clear", "paths": rels})
        cleared, skipped, freed = final["cleared"], final["skipped"], final["freed_bytes"]
    else:
        cleared, skipped, freed = clear_offline(_offline_dir(args.cache_dir))
    print(f"cleared {len(cleared)} file{'s' * (len(cleared) != 1)}, {status.human(freed)} freed")
    for skip in skipped:
        print(f"skipped {skip['path']}: {skip['reason']}")
    return 0


def clear_offline(cache_dir: Path) -> tuple[list[str], list[dict[str, str]], int]:
    """Drop every URL's cache files of a cache directory no mount uses.

    Raises:
        UsageError: a mount uses it, or it cannot be written.
    """
    try:
        lock = status.mount_lock(cache_dir, exclusive=True)
    except status.InUse:
        raise UsageError(f"cache directory '{cache_dir}' is used by a mount; give the mount point "
                         "('rangefs cache clear MOUNTPOINT')") from None
    except OSError as exc:
        raise UsageError(f"cache directory '{cache_dir}': {exc.strerror}") from None
    cleared: list[str] = []
    skipped: list[dict[str, str]] = []
    freed = 0
    try:
        files_dir = cache_dir / "files"
        for key in status.cache_keys(cache_dir):
            url = status.url_of(files_dir, key)
            try:
                freed += status.drop_files(files_dir, key)
                cleared.append(url)
            except status.InUse:
                skipped.append({"path": url, "reason": "open"})
            except OSError as exc:
                skipped.append({"path": url, "reason": exc.strerror or str(exc)})
    finally:
        os.close(lock)
    return cleared, skipped, freed
