"""The command line: parse arguments, call rangefs.mount, turn errors into one line and an exit code."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from rangefs import __version__
from rangefs import commands as commands_for_the_cache
from rangefs.auth import Headers, header_argument, load_netrc
from rangefs.cache import DEFAULT_BLOCK_SIZE, CacheConfig
from rangefs.control import Client
from rangefs.errors import RangefsError, UsageError
from rangefs.mount import MountOptions, daemon_pid, default_cache_dir, mount, unmount
from rangefs.netconfig import check_proxy, tls_context
from rangefs.origin import OriginConfig

_SIZE = re.compile(r"(\d+)([KMGT]?)(i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        print(f"rangefs: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _size(text: str) -> int:
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: '{text}' (e.g. 256K, 1M)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def _cache_size(text: str) -> int:
    value = _size(text)
    if value < 1 << 20:
        raise argparse.ArgumentTypeError(f"cache size '{text}' must be at least 1M")
    return value


def _free_space(text: str) -> tuple[int | None, float]:
    """``SIZE`` (bytes, None percent) or ``PCT%`` (None bytes, the percent)."""
    stripped = text.strip()
    if stripped.endswith("%"):
        try:
            percent = float(stripped[:-1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a percentage: '{text}' (e.g. 5%)") from None
        if not 0 <= percent < 100:
            raise argparse.ArgumentTypeError(f"percentage must be from 0 to under 100: '{text}'")
        return None, percent
    try:
        return _size(stripped), 0.0
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"not a size or percentage: '{text}' (e.g. 10G, 5%)") from None


def _block_size(text: str) -> int:
    value = _size(text)
    if value < 4096 or value > 64 << 20 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"block size '{text}' must be a power of two from 4K to 64M")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: '{text}'") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: '{text}'")
    return value


def _seconds(text: str) -> float:
    """A duration that may be zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: '{text}'") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be zero or a positive number: '{text}'")
    return value


def _bytes_per_second(text: str) -> int:
    """A rate in bytes per second, as a size (``1K`` is 1024); zero allowed."""
    try:
        return _size(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"not a rate in bytes per second: '{text}' (e.g. 1024, 10K)") from None


def _count(text: str) -> int:
    if not text.isdigit() or int(text) > 100:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to 100: '{text}'")
    return int(text)


def _connections(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 64: '{text}'")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rangefs", description="Mount HTTP(S) URLs as read-only files, fetched by range.")
    parser.add_argument("--version", action="version", version=f"rangefs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = commands.add_parser("mount", help="mount a URL list", description="Mount a URL list as read-only files.",
                            epilog="https trusts the certificates of --ca-bundle, else of SSL_CERT_FILE or "
                                   "SSL_CERT_DIR when set, else certifi's; a certificate that fails verification "
                                   "fails at once, unretried. HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY "
                                   "(or lowercase) are honoured as curl does. Headers, netrc logins and a URL's "
                                   "user info go only to the listed URL's origin, never after a redirect to "
                                   "another; give secret headers with @FILE, not on the command line (ps shows it).")
    m.add_argument("url_list", metavar="URLS", type=Path, help="the URL list: 'URL [PATH]' per line")
    m.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, help="an existing empty directory")
    m.add_argument("--cache-dir", type=Path, default=None,
                   help="cache directory, created 0700; refused if another user owns it or others may write it "
                        "(default: $XDG_CACHE_HOME/rangefs, else ~/.cache/rangefs)")
    m.add_argument("-f", "--foreground", action="store_true", help="stay attached; log to stderr")
    m.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    m.add_argument("--log-file", type=Path, help="log file (default: CACHE_DIR/rangefs.log)")
    m.add_argument("--skip-unavailable", action="store_true",
                   help="mount without the URLs that answer 404 or cannot be reached (default: fail)")
    m.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    m.add_argument("--growing", action="store_true",
                   help="files may grow by appends: keep their cached prefix when they do (per file: grow=yes)")
    m.add_argument("--no-passthrough", dest="passthrough", action="store_false",
                   help="serve every read through rangefs, also of files that are complete in the cache "
                        "(default: the kernel reads those from the cache directly, where it can)")
    m.add_argument("--direct-io", action="store_true",
                   help="open files not complete in the cache with direct I/O: faster for large reads "
                        "(1 MiB), slower for small ones (each read reaches rangefs); needs Linux >= 6.6")
    m.add_argument("--tune-system", action="store_true",
                   help="as root, change system-wide settings for speed: raise fs.pipe-max-size to 2 MiB (left "
                        "raised) so replies can be spliced from the cache, and mount fusectl at "
                        "/sys/fs/fuse/connections if missing (default: change nothing outside this mount)")
    m.add_argument("--block-size", type=_block_size, default=DEFAULT_BLOCK_SIZE,
                   help="cache block size, a power of two (default: 64K)")
    m.add_argument("--checkpoint-interval", type=_positive, default=5.0, metavar="SECONDS",
                   help="flush cached data to disk at least this often while reading; progress is "
                        "saved every few MiB without waiting for it (default: 5)")
    m.add_argument("--revalidate-interval", type=_seconds, default=60.0, metavar="SECONDS",
                   help="on open, ask the server whether a file changed if this long has passed since it "
                        "last said (0: at every open; default: 60)")
    m.add_argument("--max-connections", type=_connections, default=8, metavar="N",
                   help="range requests in flight at once per server (scheme://host:port) over the whole "
                        "mount: a sequential reader's prefetch uses several when one connection is slower "
                        "than the reader; the requests asking servers about files at mount and open are "
                        "bounded separately (default: 8, like aria2c -x)")
    m.add_argument("--cache-max-size", type=_cache_size, default=None, metavar="SIZE",
                   help="bound the cache directory's allocated bytes (K, M, G, T: powers of 1024); the least "
                        "recently used data goes first (default: no bound but --cache-min-free)")
    m.add_argument("--cache-min-free", type=_free_space, default=(None, 5.0), metavar="SIZE|PCT",
                   help="keep this much of the cache's filesystem free, as a size or a percentage of it "
                        "(default: 5%%)")
    m.add_argument("--connect-timeout", type=_positive, default=10.0, metavar="SECONDS")
    m.add_argument("--read-timeout", type=_positive, default=30.0, metavar="SECONDS",
                   help="longest wait for the next bytes of an answer (default: 30)")
    m.add_argument("--retries", type=_count, default=5,
                   help="retries without progress per request; a cut for --low-speed-limit, or "
                        "reconnections that together fall under it, count even after progress (default: 5)")
    m.add_argument("--retry-time", type=_positive, default=120.0, metavar="SECONDS",
                   help="longest time a request retries without progress (default: 120)")
    m.add_argument("--low-speed-limit", type=_bytes_per_second, default=1024, metavar="BYTES/S",
                   help="cut and retry a request that gets fewer bytes per second than this over "
                        "--low-speed-time, its wait for the answer included (0: never; default: 1024)")
    m.add_argument("--low-speed-time", type=_seconds, default=15.0, metavar="SECONDS",
                   help="the time over which --low-speed-limit is measured (0: never; default: 15)")
    m.add_argument("--allow-insecure-redirect", action="store_true",
                   help="follow redirects from https to http (default: refuse them)")
    m.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'|@FILE",
                   help="send this header with every request (repeatable); @FILE: one 'Name: value' per line")
    m.add_argument("--netrc", action="store_true", help="log in with ~/.netrc's login for the host, as curl")
    m.add_argument("--netrc-file", type=Path, metavar="FILE", help="as --netrc, from FILE")
    m.add_argument("--ca-bundle", type=Path, metavar="FILE", help="trust the CA certificates of this PEM file")
    m.add_argument("--client-cert", type=Path, metavar="FILE",
                   help="present this PEM certificate (and its key, unless --client-key) to https servers")
    m.add_argument("--client-key", type=Path, metavar="FILE", help="the unencrypted PEM key of --client-cert")
    m.add_argument("--proxy", metavar="URL",
                   help="send every request through this proxy, http://[user:password@]host:port; NO_PROXY "
                        "still applies (default: the *_PROXY variables)")
    m.add_argument("--probe-timeout", type=_positive, default=120.0, metavar="SECONDS",
                   help="longest time for asking the server about every URL before mounting; URLs not "
                        "answered by then fail (default: 120)")

    u = commands.add_parser("unmount", help="unmount and wait for the daemon to save its state",
                            description="Unmount a rangefs mount; waits until its state is saved.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    u.add_argument("-z", "--lazy", action="store_true", help="detach now even if files are open")
    u.add_argument("--timeout", type=_positive, default=60.0, metavar="SECONDS")

    r = commands.add_parser("reload", help="read the URL list again and change the mount to match",
                            description="Read a mount's URL list again (as SIGHUP to its daemon does): new entries "
                                        "appear, removed ones disappear (files open on them read on until closed); "
                                        "a list with an error is refused with its line, and the mount keeps its files.")
    r.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    r.add_argument("--timeout", type=_positive, default=60.0, metavar="SECONDS")
    commands_for_the_cache.add_parsers(commands)
    return parser


def _reload(mountpoint: Path, timeout: float) -> None:
    """Ask the daemon over its control socket (rangefs.control); a refused list raises UsageError."""
    if daemon_pid(mountpoint) is None:
        raise UsageError(f"'{mountpoint}' is not a rangefs mount")
    root, pid, _ = commands_for_the_cache.find_mount_of(mountpoint)
    with Client(root, pid, timeout) as client:
        outcome = client.ask({"op": "reload"})["reload"]
    print(f"rangefs: reloaded {root}: {outcome}")


def _canonical(mountpoint: Path) -> Path:
    """The mount point as the mount table names it: its parent's links and ``..`` resolved.

    The mount point itself is not resolved: that would stat it, and a hung mount would hang the
    command meant to remove it.
    """
    absolute = mountpoint.absolute()
    if absolute.name in ("", ".."):  # the root, or a path ending in "..": its own parent is resolved
        return Path(os.path.realpath(absolute))
    return Path(os.path.realpath(absolute.parent)) / absolute.name


def _absolute(path: Path | None) -> str | None:
    return None if path is None else str(path.absolute())  # the daemon leaves the working directory


def _origin_access(args: argparse.Namespace, config: OriginConfig) -> OriginConfig:
    """``config`` with the headers, logins, TLS files and proxy asked for, checked now (one line when bad)."""
    headers: Headers = tuple(pair for argument in args.header for pair in header_argument(argument))
    netrc = load_netrc(_absolute(args.netrc_file)) if args.netrc or args.netrc_file else ()
    if args.client_key and not args.client_cert:
        raise UsageError("--client-key needs --client-cert")
    ca_bundle, client_cert = _absolute(args.ca_bundle), _absolute(args.client_cert)
    client_key = _absolute(args.client_key)
    tls_context(ca_bundle, client_cert, client_key)  # a file that cannot be used fails the command, not the daemon
    proxy = check_proxy(args.proxy) if args.proxy is not None else None
    return dataclasses.replace(config, headers=headers, netrc=netrc, proxy=proxy, ca_bundle=ca_bundle,
                               client_cert=client_cert, client_key=client_key)


def _mount_options(args: argparse.Namespace) -> MountOptions:
    cache_dir = (args.cache_dir or default_cache_dir()).absolute()
    return MountOptions(
        url_list=args.url_list,
        mountpoint=_canonical(args.mountpoint),
        cache_dir=cache_dir,
        foreground=args.foreground,
        verbose=args.verbose,
        log_file=args.log_file.absolute() if args.log_file else None,
        skip_unavailable=args.skip_unavailable,
        allow_other=args.allow_other,
        growing=args.growing,
        passthrough=args.passthrough,
        direct_io=args.direct_io,
        tune_system=args.tune_system,
        probe_timeout=args.probe_timeout,
        cache=CacheConfig(cache_dir, block_size=args.block_size, checkpoint_interval=args.checkpoint_interval,
                          revalidate_interval=args.revalidate_interval, max_connections=args.max_connections,
                          max_bytes=args.cache_max_size, min_free_bytes=args.cache_min_free[0],
                          min_free_percent=args.cache_min_free[1]),
        origin=_origin_access(args, OriginConfig(
            connect_timeout=args.connect_timeout, read_timeout=args.read_timeout, retries=args.retries,
            retry_time=args.retry_time, low_speed_limit=args.low_speed_limit, low_speed_time=args.low_speed_time,
            allow_insecure_redirect=args.allow_insecure_redirect)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        if args.command == "mount":
            mount(_mount_options(args))
        elif args.command == "reload":
            _reload(_canonical(args.mountpoint), args.timeout)
        elif args.command == "unmount":
            unmount(_canonical(args.mountpoint), lazy=args.lazy, timeout=args.timeout)
        else:
            return commands_for_the_cache.run(args)
    except (RangefsError, UsageError) as exc:
        print(f"rangefs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
