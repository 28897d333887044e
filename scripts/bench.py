"""The benchmark behind ``make bench``: rangefs against curl, rclone and local reads, on loopback.

It generates its data once into a work dir (a seeded 1 GiB random file and a few minutes of MP4
whose index sits at the end), serves it with the test suite's nginx on 127.0.0.1 and runs each case
``--runs`` times: cold and warm sequential reads, cold random 4 KiB reads, ``tail -c``, ``ffprobe``,
seek-and-decode, and the cold sequential read again through a delaying proxy (``latency_proxy.py``)
that adds ``--rtt-ms`` of round-trip time, and from a server that caps each connection (nginx's
``limit_rate``, and the same proxy pacing each connection). Cold means a fresh cache dir and a
dropped page cache (for ``tail``, ``ffprobe`` and ``ffmpeg``, the tool itself is then loaded once, untimed).
Only when asked for (``--cases player``, as generating its movie takes minutes): a player jumping to
four places of a 10 min, 12 Mbit/s movie.
Bytes fetched and GET requests come from nginx's access log; bytes a decoder read through the mount
from its ``rchar`` (see ``counted``); peak memory is the daemon's VmHWM plus its fetch process's.

It prints the command line, machine facts and a Markdown table of medians, ratios and the issue's
targets (PASS/MISS, which never fail the run), and writes every sample to
``results/bench-YYYYmmdd-HHMMSS.json``. Every process it starts is ended by pid and every mount it
makes is unmounted, also on failure or Ctrl-C. A failed case is reported with its reason and the
run goes on. Run it with ``make bench`` or ``.venv/bin/python scripts/bench.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from procs import alive, children  # noqa: E402

import rangefs.cache  # noqa: E402
import rangefs.kernel  # noqa: E402
import rangefs.mount  # noqa: E402

from nginx import Nginx  # noqa: E402  (the test suite's nginx helper)

RANGEFS = str(Path(sys.executable).parent / "rangefs")  # the CLI of this very venv
LATENCY_PROXY = REPO / "scripts" / "latency_proxy.py"
MB = 1_000_000  # throughput and memory are reported in decimal MB
MiB = 1 << 20
GEN_CHUNK = 16 * MiB

CACHE_LIMIT_MIB = 256  # the seq_cold row with --cache-max-size: a quarter of the default big file
CASES = ("seq_cold", "seq_warm", "random4k", "tail", "ffprobe", "seek", "seq_rtt", "proxy", "capped", "player")
CAPPED_RATE = "8m"  # nginx limit_rate of /slow/ (it counts per request), for the capped case
CAPPED_PROXY_RATE = 8 * MiB  # bytes/s: the same cap, kept per connection over time by latency_proxy.py
CAPPED_SIZE = 128 * MiB
ARIA2 = "aria2c -x8 -s8 -k1M"  # the capped cases' peer, also its row's label
READ_TIMEOUT = 300.0  # seconds for one read of the big file; 1 GiB at ~3.5 MB/s
TOOL_BUDGET = 150.0  # seconds: a tool stops repeating a case after this, so a slow build stays ~10 min
CMD_TIMEOUT = 120.0  # seconds for any other command
MOUNT_TIMEOUT = 60.0
UNMOUNT_TIMEOUT = 60.0
RANDOM_READS = 100
RANDOM_READ_SIZE = 4096
RANDOM_SEED = 4096
TAIL_BYTES = 1000
SEEK_SECONDS = 5
MOVIE_SECONDS = 600  # the player case's movie: 10 min at ~12 Mbit/s, ~900 MB (the was 865 MiB)
PLAYER_JUMPS = (0.15, 0.4, 0.65, 0.9)  # where the player jumps to, as fractions of the movie
PLAYER_SECONDS = 3  # played at each jump, in real time (-re)


class BenchError(Exception):
    """An expected failure of one step: its message is the one line to report."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwind through the clean-up like Ctrl-C does."""


# -- configuration and data ------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    runs: int
    cases: tuple[str, ...]
    work_dir: Path
    rtt_ms: float
    skip_rclone: bool
    quick: bool
    block_size: int = 0  # rangefs --block-size; 0: rangefs's default

    @property
    def rangefs_block(self) -> int:
        return self.block_size or rangefs.cache.DEFAULT_BLOCK_SIZE

    @property
    def big_size(self) -> int:
        return (256 if self.quick else 1024) * MiB

    @property
    def video_seconds(self) -> int:
        return 30 if self.quick else 180


@dataclass(frozen=True)
class Data:
    """The generated files, relative to the www dir nginx serves."""

    www: Path
    big: str
    big_size: int
    video: str
    video_size: int
    video_seconds: int
    capped: str = ""  # the file of the capped case
    capped_size: int = 0
    movie: str = ""  # the player case's movie, generated only when that case runs
    movie_size: int = 0


def parse_args(argv: Sequence[str]) -> Config:
    parser = argparse.ArgumentParser(description="Benchmark rangefs against curl, rclone and local reads.")
    parser.add_argument("--runs", type=int, default=None, help="runs per case, median reported (default 5)")
    parser.add_argument("--cases", default=",".join(c for c in CASES if c != "player"),
                        help=f"comma list, from: {', '.join(CASES)} (default: all but player)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/rangefs-bench"))
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="added round-trip time for seq_rtt")
    parser.add_argument("--skip-rclone", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 MiB, 30 s video, 1 run")
    parser.add_argument("--block-size", type=int, default=0, metavar="BYTES",
                        help="mount rangefs with this --block-size (default: rangefs's default)")
    args = parser.parse_args(argv)
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        parser.error(f"unknown case(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}")
    runs = args.runs if args.runs is not None else (1 if args.quick else 5)
    if runs < 1:
        parser.error("--runs must be at least 1")
    return Config(runs, cases, args.work_dir.resolve(), args.rtt_ms, args.skip_rclone, args.quick, args.block_size)


def prepare_data(cfg: Config) -> Data:
    """Generate the files into WORK/www unless they are there already with the right size."""
    www = cfg.work_dir / "www"
    www.mkdir(parents=True, exist_ok=True)
    big = f"random-{cfg.big_size // MiB}M.bin"
    if not _has_size(www / big, cfg.big_size):
        _generate_random(www / big, cfg.big_size)
    video = f"video-{cfg.video_seconds}s.mp4"
    if not _has_size(www / video, _recorded_size(www, video)):
        _generate_video(www / video, cfg.video_seconds)
        _record_size(www, video)
    movie = ""
    if "player" in cfg.cases:
        movie = f"movie-{MOVIE_SECONDS}s.mp4"
        if not _has_size(www / movie, _recorded_size(www, movie)):
            _generate_video(www / movie, MOVIE_SECONDS, movie=True)
            _record_size(www, movie)
    capped = f"random-{CAPPED_SIZE // MiB}M.bin"
    if not _has_size(www / capped, CAPPED_SIZE):
        _generate_random(www / capped, CAPPED_SIZE)
    return Data(www, big, cfg.big_size, video, (www / video).stat().st_size, cfg.video_seconds, capped, CAPPED_SIZE,
                movie, (www / movie).stat().st_size if movie else 0)


def _has_size(path: Path, size: int | None) -> bool:
    return size is not None and path.is_file() and path.stat().st_size == size


def _recorded_size(www: Path, name: str) -> int | None:
    try:
        return int(json.loads((www / ".sizes.json").read_text())[name])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _record_size(www: Path, name: str) -> None:
    manifest = www / ".sizes.json"
    try:
        sizes = json.loads(manifest.read_text())
    except (OSError, ValueError):
        sizes = {}
    sizes[name] = (www / name).stat().st_size
    manifest.write_text(json.dumps(sizes, indent=1) + "\n")


def _generate_random(path: Path, size: int) -> None:
    """Seeded random bytes, 16 MiB at a time; written under a temporary name, then renamed."""
    say(f"generating {path} ({size // MiB} MiB of seeded random bytes)")
    rng = random.Random(0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for _ in range(size // GEN_CHUNK):
            out.write(rng.randbytes(GEN_CHUNK))
    tmp.rename(path)


def _generate_video(path: Path, seconds: int, movie: bool = False) -> None:
    """testsrc2 + sine, 640x360 mpeg4 at 2.5 Mbit/s, without +faststart: the index is at the end.
    ``movie``: 1280x720 with noise at a constant 12 Mbit/s (the noise keeps the encoder from
    falling short of it), like the issue's movie."""
    say(f"generating {path} ({seconds} s of test video, index at the end)")
    tmp = path.with_name(path.stem + ".tmp.mp4")
    video = (["-vf", "noise=alls=12:allf=t", "-c:v", "mpeg4", "-b:v", "12M", "-minrate", "12M", "-maxrate", "12M",
              "-bufsize", "4M"] if movie else ["-c:v", "mpeg4", "-b:v", "2500k"])
    run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=duration={seconds}:size={'1280x720' if movie else '640x360'}:rate=25",
         "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
         *video, "-c:a", "aac", "-b:a", "128k", "-shortest", "-f", "mp4", str(tmp)],
        timeout=300 + seconds)
    tmp.rename(path)


# -- processes --------------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def run(argv: Sequence[str], timeout: float = CMD_TIMEOUT, stdin: int | None = subprocess.DEVNULL) -> str:
    """Run a command to its end in its own session; return stdout + stderr. Raise BenchError when it fails."""
    try:
        proc = subprocess.Popen(list(argv), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError as exc:
        raise BenchError(f"cannot run {argv[0]}: {exc.strerror}") from None
    out, err = _communicate(proc, argv, timeout)
    if proc.returncode != 0:
        lines = (err or out).decode(errors="replace").strip().splitlines()
        raise BenchError(f"{_short(argv)} failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")
    return (out + err).decode(errors="replace")


def _communicate(proc: subprocess.Popen[bytes], argv: Sequence[str], timeout: float) -> tuple[bytes, bytes]:
    """Wait for ``proc``; on timeout or interrupt kill it (by pid) and wait a bounded time."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise BenchError(f"{_short(argv)} did not finish within {timeout:.0f} s") from None
    except BaseException:
        _kill(proc)
        raise


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # stuck in a FUSE read: the unmount in clean-up releases it
        say(f"warning: pid {proc.pid} ({_short(proc.args)}) did not exit after SIGKILL")  # type: ignore[arg-type]


def timed(argv: Sequence[str], timeout: float = READ_TIMEOUT) -> tuple[float, str]:
    """Run a command, return (elapsed seconds, its output)."""
    start = time.monotonic()
    out = run(argv, timeout)
    return time.monotonic() - start, out


def counted(argv: Sequence[str], timeout: float = CMD_TIMEOUT) -> tuple[float, int]:
    """Run a command; return (elapsed seconds, bytes it read: ``rchar`` of /proc/PID/io).

    Read once it has exited but before it is reaped (``waitid`` with ``WNOWAIT``), so every read
    counts. rchar counts every ``read()`` of the process, not only of the file: ``ffmpeg
    -version`` shows about 0.2 MB of others (``/proc``, configuration), the error of this figure.
    Libraries are mapped, not read.
    """
    start = time.monotonic()
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        raise BenchError(f"cannot run {argv[0]}: {exc.strerror}") from None
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # no timeout: the read timeouts bound it
        elapsed = time.monotonic() - start
        io = dict(line.split(": ") for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines())
    finally:
        _, err = _communicate(proc, argv, timeout)
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise BenchError(f"{_short(argv)} failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")
    return elapsed, int(io["rchar"])


def _short(argv: Sequence[str] | str) -> str:
    text = argv if isinstance(argv, str) else shlex.join(str(a) for a in argv)
    return f"'{text if len(text) < 90 else text[:87] + '...'}'"


def wait_pid(pid: int, timeout: float) -> bool:
    """Wait for ``pid`` (not necessarily our child) to be gone; reap it if it is our child."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def end_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, wait, SIGKILL: end a process we started, by its pid."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_pid(pid, timeout):
            return


def peak_rss(pid: int | None) -> int | None:
    """VmHWM of ``pid`` plus that of its children (rangefs' fetch process), in bytes; None when unknown.

    The sum of each process's own peak: an upper bound of their peak together.
    """
    if pid is None:
        return None
    peaks = [_vm_hwm(p) for p in [pid, *children(pid)]]
    return sum(p for p in peaks if p is not None) if peaks[0] is not None else None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of ``pid`` and its children (rangefs' fetch process) so far; None when unknown.

    Steadier than throughput on a machine whose speed drifts: the work a tool does per GiB.
    """
    if pid is None:
        return None
    times = [_cpu_time(p) for p in [pid, *children(pid)]]
    return sum(t for t in times if t is not None) if times[0] is not None else None


def _cpu_time(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


def _vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def drop_page_cache() -> str | None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; None when done, else why not."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        return f"drop_caches: {exc.strerror}"
    return None


# -- mounts -----------------------------------------------------------------------------------


def mount_source(mountpoint: Path) -> str | None:
    """The source field of what is mounted exactly at ``mountpoint`` (also a FUSE mount whose daemon
    died); None when nothing is."""
    entry = rangefs.kernel.find_mount(mountpoint)
    return entry.source if entry else None


def is_mounted(mountpoint: Path) -> bool:
    return mount_source(mountpoint) is not None


def lazy_unmount(mountpoint: Path) -> None:
    if is_mounted(mountpoint):
        try:
            run(["fusermount3", "-u", "-z", str(mountpoint)], timeout=30)
        except BenchError as exc:
            say(f"warning: {exc}")


class Mount:
    """A mounted filesystem of one tool; ``unmount()`` ends it and its process, also after failures."""

    tool = ""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.pid: int | None = None

    def path(self, rel: str) -> Path:
        return self.mountpoint / rel

    def peak_rss(self) -> int | None:
        return peak_rss(self.pid)

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.pid)

    def unmount(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Last resort after a failed clean unmount: detach lazily, end the process by pid."""
        lazy_unmount(self.mountpoint)
        if self.pid is not None and alive(self.pid):
            end_pid(self.pid)


class RangefsMount(Mount):
    tool = "rangefs"

    def __init__(self, mountpoint: Path, url_list: Path, cache_dir: Path, block_size: int = 0,
                 options: Sequence[str] = ()) -> None:
        super().__init__(mountpoint)
        extra = [*(["--block-size", str(block_size)] if block_size else []), *options]
        run([RANGEFS, "mount", str(url_list), str(mountpoint), "--cache-dir", str(cache_dir), *extra], MOUNT_TIMEOUT)
        if not is_mounted(mountpoint):
            raise BenchError("'rangefs mount' returned, but nothing is mounted")
        self.pid = self._daemon_pid()
        if "--direct-io" in options:  # without the kernel's or pyfuse3's support it would measure the default
            log = (cache_dir / "rangefs.log").read_text(encoding="utf-8", errors="replace")
            if "opened with direct I/O" not in log:
                raise BenchError(f"--direct-io did not take effect (see {cache_dir / 'rangefs.log'})")

    def _daemon_pid(self) -> int | None:
        """The daemon's pid, which it names in the mount table (``rangefs:PID``)."""
        return rangefs.mount.daemon_pid(self.mountpoint)

    def unmount(self) -> None:
        try:
            if is_mounted(self.mountpoint):
                run([RANGEFS, "unmount", str(self.mountpoint), "--timeout", str(UNMOUNT_TIMEOUT)],
                    UNMOUNT_TIMEOUT + 10)
        finally:
            self._finish()


class RcloneMount(Mount):
    tool = "rclone"

    def __init__(self, mountpoint: Path, base_url: str, cache_dir: Path, work: Path) -> None:
        super().__init__(mountpoint)
        self.log = cache_dir.parent / "rclone.log"
        argv = ["rclone", "mount", ":http:", str(mountpoint), "--http-url", base_url + "/",
                "--vfs-cache-mode", "full", "--cache-dir", str(cache_dir), "--config", str(work / "rclone.conf"),
                "--log-file", str(self.log), "--log-level", "INFO"]
        (work / "rclone.conf").touch()
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise BenchError(f"cannot run rclone: {exc.strerror}") from None
        self.pid = self._proc.pid
        self._wait_mounted()

    def _wait_mounted(self) -> None:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(self.mountpoint):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._finish()
                tail = _tail(self.log)
                raise BenchError(f"rclone mount did not come up{': ' + tail if tail else ''}")
            time.sleep(0.05)

    def unmount(self) -> None:
        try:
            if is_mounted(self.mountpoint):
                run(["fusermount3", "-u", str(self.mountpoint)], UNMOUNT_TIMEOUT)
            if not wait_pid(self._proc.pid, UNMOUNT_TIMEOUT):
                raise BenchError(f"rclone (pid {self._proc.pid}) did not exit after the unmount")
        finally:
            self._finish()
            self._proc.poll()


def _tail(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


# -- the bench context --------------------------------------------------------------------------


@dataclass
class Sample:
    """One run of one tool in one case."""

    seconds: float
    fetched: int | None = None  # body bytes nginx sent for the file
    gets: int | None = None  # GET requests nginx saw for the file
    peak_rss: int | None = None  # bytes, VmHWM of the daemon + its children
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Measure:
    """All runs of one tool in one case."""

    case: str
    tool: str
    size: int  # bytes read, for MB/s; 0 when throughput means nothing here
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None
    note: str = ""

    def median(self, name: str) -> float | None:
        values = [getattr(s, name) if name in Sample.__dataclass_fields__ else s.extra.get(name)
                  for s in self.samples]
        present = [float(v) for v in values if v is not None]
        return statistics.median(present) if present else None

    def mbps(self) -> float | None:
        seconds = self.median("seconds")
        return self.size / MB / seconds if self.size and seconds else None


class Bench:
    """Everything a case needs: the config, the data, nginx, the registry of things to undo."""

    def __init__(self, cfg: Config, data: Data, nginx: Nginx) -> None:
        self.cfg, self.data, self.nginx = cfg, data, nginx
        self.measures: list[Measure] = []
        self.drop_error = drop_page_cache()
        self.rclone_error = None if cfg.skip_rclone else ensure_rclone()
        self.mounts: list[Mount] = []  # mounted and not yet unmounted
        self.pids: list[int] = []  # started and not yet ended
        self.runs_dir = cfg.work_dir / "runs"

    def drop(self) -> None:
        if self.drop_error is None:
            self.drop_error = drop_page_cache()

    def fresh_dir(self, name: str) -> Path:
        path = self.runs_dir / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def fetched(self, rel: str, since: int) -> tuple[int, int]:
        """(body bytes, GET requests) nginx logged for ``rel`` since ``since``, once the log settles."""
        settle_log(self.nginx, since)
        gets = [r for r in self.nginx.requests(since) if r.method == "GET" and r.path == "/" + rel]
        return sum(r.body_bytes for r in gets), len(gets)

    @contextmanager
    def mount(self, tool: str, base_url: str, name: str) -> Iterator[Mount]:
        """A fresh mount of the data files (fresh cache dir) by ``tool``, unmounted on exit.
        ``tool`` is "rclone", or "rangefs" followed by any mount options ("rangefs --direct-io")."""
        run_dir = self.fresh_dir(name)
        (run_dir / "mnt").mkdir()
        name, *options = tool.split()
        if name == "rangefs":
            urls = run_dir / "urls.txt"
            listed = (self.data.big, self.data.video, self.data.capped, *([self.data.movie] if self.data.movie else []))
            urls.write_text("".join(f"{base_url}/{rel}\n" for rel in listed))
            mnt: Mount = RangefsMount(run_dir / "mnt", urls, run_dir / "cache", self.cfg.block_size, options)
        elif self.rclone_error is not None:
            raise BenchError(self.rclone_error)
        else:
            mnt = RcloneMount(run_dir / "mnt", base_url, run_dir / "cache", self.cfg.work_dir)
        self.mounts.append(mnt)
        try:
            run(["ls", "-l", str(mnt.mountpoint)], CMD_TIMEOUT)  # listing and sizes first, for both tools
            yield mnt
        finally:
            self.mounts.remove(mnt)
            try:
                mnt.unmount()
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)

    def clean_up(self) -> None:
        for mnt in list(self.mounts):
            try:
                mnt.unmount()
            except BenchError as exc:
                say(f"warning: {exc}")
        for pid in list(self.pids):
            end_pid(pid)
        shutil.rmtree(self.runs_dir, ignore_errors=True)


def settle_log(nginx: Nginx, since: int, quiet: float = 0.3, limit: float = 5.0) -> None:
    """Wait until no new access-log record appeared for ``quiet`` s: aborted transfers log late."""
    deadline = time.monotonic() + limit
    count = len(nginx.requests(since))
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = len(nginx.requests(since))
        if now == count:
            return
        count = now


def ensure_rclone() -> str | None:
    """Install rclone with apt-get when missing; None when available, else why not."""
    if shutil.which("rclone"):
        return None
    say("rclone is missing: apt-get install -y rclone")
    for argv in (["apt-get", "install", "-y", "-q", "rclone"], ["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "rclone"]):
        try:
            run(argv, timeout=600)
        except BenchError as exc:
            reason = str(exc)
            continue
        if shutil.which("rclone"):
            return None
    return f"rclone not available ({reason})"


# -- measuring --------------------------------------------------------------------------------


def measure(bench: Bench, case: str, size: int, tools: Sequence[tuple[str, Callable[[], Sample]]]) -> None:
    """Run each tool's ``once`` --runs times, taking turns, in an order shuffled run by run
    (seeded: every bench run uses the same orders).

    This machine's speed drifts during a run (rclone's cold read measured 125-346 MB/s on one day);
    taking turns makes the drift fall on every tool alike instead of on whichever ran last. The
    shuffle keeps a tool from always running in the same place and after the same tool: what ran
    before can carry over (a cold read right after a tool that wrote and deleted 1 GiB tended to
    run slower), and a fixed order (or one that only rotates) puts each tool after the same
    neighbour in nearly every run. A tool stops repeating after TOOL_BUDGET seconds of its own
    runs, and at its first failure (kept).
    """
    entries: list[tuple[Measure, Callable[[], Sample]]] = []
    for tool, once in tools:
        if tool == "rclone" and bench.cfg.skip_rclone:
            continue
        result = Measure(case, tool, size)
        bench.measures.append(result)
        entries.append((result, once))
    spent = {id(result): 0.0 for result, _ in entries}
    for i in range(bench.cfg.runs):
        order = list(entries)
        random.Random(i).shuffle(order)
        for result, once in order:
            if result.error:
                continue
            if i and spent[id(result)] > TOOL_BUDGET:
                result.note = result.note or f"stopped after {i} run(s): over the {TOOL_BUDGET:.0f} s budget"
                continue
            say(f"{case}: {result.tool} run {i + 1}")
            started = time.monotonic()
            try:
                result.samples.append(once())
            except (BenchError, OSError) as exc:
                result.error = str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"
                say(f"{case}: {result.tool} failed: {result.error}")
            spent[id(result)] += time.monotonic() - started


def cold_mount_run(bench: Bench, tool: str, base_url: str, rel: str, op: Callable[[Path], Sample],
                   logged: str | None = None) -> Sample:
    """Mount afresh, drop the page cache, run ``op`` on the file; add bytes fetched and peak RSS.
    ``logged``: the file's path in nginx's log, when not ``rel`` (a location such as slow/)."""
    with bench.mount(tool, base_url, "mount") as mnt:
        bench.drop()
        since = bench.nginx.mark()
        cpu_before = mnt.cpu_seconds()
        sample = op(mnt.path(rel))
        cpu_after = mnt.cpu_seconds()
        sample.peak_rss = mnt.peak_rss()
        if cpu_before is not None and cpu_after is not None:
            sample.extra["cpu_s"] = cpu_after - cpu_before
    sample.fetched, sample.gets = bench.fetched(logged or rel, since)
    return sample


def dd_op(size: int) -> Callable[[Path], Sample]:
    def op(path: Path) -> Sample:
        seconds, out = timed(["dd", f"if={path}", "of=/dev/null", "bs=1M"])
        copied = re.search(r"^(\d+) bytes", out, re.MULTILINE)
        if copied is None or int(copied.group(1)) != size:
            raise BenchError(f"dd read {copied.group(1) if copied else '?'} bytes of {size}")
        return Sample(seconds)
    return op


def curl_run(bench: Bench, url: str, rel: str, size: int, to_file: bool, cold: bool = True) -> Sample:
    """curl the URL to /dev/null or to a file in the work dir (the disk the caches are on)."""
    target = bench.cfg.work_dir / "curl-output.bin" if to_file else Path("/dev/null")
    try:
        if to_file:
            target.unlink(missing_ok=True)
        if cold:
            bench.drop()
        since = bench.nginx.mark()
        seconds, out = timed(["curl", "-sS", "-f", "-o", str(target), "-w", "%{size_download}\n", url])
        if int(out.split()[0]) != size:
            raise BenchError(f"curl got {out.split()[0]} bytes of {size}")
    finally:
        if to_file:
            target.unlink(missing_ok=True)
    return Sample(seconds, *bench.fetched(rel, since))


# -- the cases ----------------------------------------------------------------------------------


def case_seq(bench: Bench, case: str, base_url: str) -> None:
    """Cold sequential read of the big file: rangefs (also with --direct-io, not a target's row),
    curl to /dev/null and to a file, rclone."""
    data = bench.data
    url = f"{base_url}/{data.big}"
    tools: list[tuple[str, Callable[[], Sample]]] = []
    # A cache limit below the file's size: what eviction costs a cold read (seq_cold only).
    capped = (f"rangefs --cache-max-size {CACHE_LIMIT_MIB}M",) if case == "seq_cold" else ()
    for tool in ("rangefs", "rangefs --direct-io", *capped, "curl -o /dev/null", "curl -o FILE", "rclone"):
        if tool.startswith("curl"):
            tools.append((tool, partial(curl_run, bench, url, data.big, data.big_size, tool.endswith("FILE"))))
        else:
            tools.append((tool, partial(cold_mount_run, bench, tool, base_url, data.big, dd_op(data.big_size))))
    measure(bench, case, data.big_size, tools)
    for m in bench.measures:
        cpu = m.median("cpu_s") if m.case == case else None
        if cpu is not None:
            m.note = (m.note + "; " if m.note else "") + f"CPU of its processes during the read: {cpu:.2f} s (median)"


def case_capped(bench: Bench) -> None:
    """Cold sequential read from a server that caps each connection: rangefs (dd through the mount)
    vs aria2c -x8 -s8 -k1M and curl, each writing to a file; twice.

    ``capped``: nginx's limit_rate on /slow/. It counts per request, and each request's first MiBs
    escape it into loopback socket buffers, so a client of many short ranges on kept-alive
    connections (rangefs) is barely slowed while one of a few long ranges (aria2c, curl) is.
    ``capped_proxy``: the cap kept per connection over its whole life by latency_proxy.py --rate-mbs
    in front of the unthrottled location, as a CDN that caps each connection does: the fair row.
    """
    data = bench.data
    capped_runs(bench, "capped", f"{bench.nginx.base_url}/slow", f"slow/{data.capped}")
    with latency_proxy(bench, 0.0, CAPPED_PROXY_RATE) as port:
        capped_runs(bench, "capped_proxy", f"http://127.0.0.1:{port}", data.capped)


def capped_runs(bench: Bench, case: str, base_url: str, logged: str) -> None:
    data = bench.data
    url = f"{base_url}/{data.capped}"
    tools: list[tuple[str, Callable[[], Sample]]] = [
        ("rangefs", partial(cold_mount_run, bench, "rangefs", base_url, data.capped, dd_op(data.capped_size), logged)),
        (ARIA2, partial(aria2_run, bench, url, logged, data.capped_size)),
        ("curl -o FILE", partial(curl_run, bench, url, logged, data.capped_size, True)),
    ]
    measure(bench, case, data.capped_size, tools)


def aria2_run(bench: Bench, url: str, logged: str, size: int) -> Sample:
    """aria2c -x8 -s8 -k1M (8 connections, 8 pieces) to a file in the work dir. -k1M: aria2's
    default --min-split-size (20M) would split the capped file into fewer pieces than 8."""
    target = bench.cfg.work_dir / "aria2-output.bin"
    try:
        target.unlink(missing_ok=True)
        bench.drop()
        since = bench.nginx.mark()
        seconds, _ = timed([*ARIA2.split(), "-q", "--allow-overwrite=true", "--auto-file-renaming=false",
                            "-d", str(target.parent), "-o", target.name, url])
        if target.stat().st_size != size:
            raise BenchError(f"aria2c wrote {target.stat().st_size} bytes of {size}")
    finally:
        target.unlink(missing_ok=True)
    return Sample(seconds, *bench.fetched(logged, since))


def case_seq_rtt(bench: Bench) -> None:
    """The cold sequential read through the delaying proxy."""
    with latency_proxy(bench, bench.cfg.rtt_ms) as port:
        case_seq(bench, "seq_rtt", f"http://127.0.0.1:{port}")


def case_proxy(bench: Bench) -> None:
    """curl to /dev/null direct and through the proxy with 0 ms delay: is the proxy a bottleneck?"""
    data = bench.data
    _warm(data.www / data.big)
    direct = f"{bench.nginx.base_url}/{data.big}"
    measure(bench, "proxy", data.big_size,
            [("curl direct", lambda: curl_run(bench, direct, data.big, data.big_size, False, cold=False))])
    with latency_proxy(bench, 0.0) as port:
        proxied = f"http://127.0.0.1:{port}/{data.big}"
        via = partial(curl_run, bench, proxied, data.big, data.big_size, False, cold=False)
        measure(bench, "proxy", data.big_size, [("curl via proxy (0 ms)", via)])


def _warm(path: Path) -> None:
    """Read a file once so that it sits in the page cache."""
    run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], READ_TIMEOUT)


@contextmanager
def latency_proxy(bench: Bench, rtt_ms: float, rate: float = 0.0) -> Iterator[int]:
    """Run latency_proxy.py in front of nginx (``rate``: bytes/s per connection, 0 for none);
    yield its port; end it by pid."""
    argv = [sys.executable, str(LATENCY_PROXY), str(bench.nginx.port), "--rtt-ms", str(rtt_ms),
            "--rate-mbs", str(rate / MB)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    bench.pids.append(proc.pid)
    try:
        yield _read_port(proc)
    finally:
        end_pid(proc.pid)
        bench.pids.remove(proc.pid)
        if proc.stdout is not None:
            proc.stdout.close()


def _read_port(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    line = proc.stdout.readline() if ready else b""
    if not line.strip().isdigit():
        raise BenchError("latency proxy did not start")
    return int(line)


def case_seq_warm(bench: Bench) -> None:
    """Second read through rangefs after a complete first one, page cache dropped or kept; local dd
    of the same bytes alike. rangefs and local dd take turns run by run, as in ``measure``."""
    data = bench.data
    local = data.www / data.big
    rangefs_tools = ("rangefs, page cache dropped", "rangefs, page cache kept")
    local_tools = ("local dd, page cache dropped", "local dd, page cache kept")
    try:
        with bench.mount("rangefs", bench.nginx.base_url, "warm") as mnt:
            fill = dd_op(data.big_size)(mnt.path(data.big))
            say(f"seq_warm: first (filling) read took {fill.seconds:.1f} s")
            wait_saved(mnt.path(data.big), data.big_size)
            since = bench.nginx.mark()
            warm_pairs(bench, "seq_warm", [(rangefs_tools, mnt.path(data.big), mnt), (local_tools, local, None)])
        fetched = bench.fetched(data.big, since)
        for m in bench.measures:
            if m.case == "seq_warm" and m.tool in rangefs_tools:
                m.note = (f"first read {fill.seconds:.1f} s; nginx sent {fetched[0]} bytes "
                          f"in {fetched[1]} GETs during the warm reads")
    except BenchError as exc:
        for tool in rangefs_tools:
            if not any(m.case == "seq_warm" and m.tool == tool for m in bench.measures):
                bench.measures.append(Measure("seq_warm", tool, data.big_size, error=str(exc)))
    if not any(m.case == "seq_warm" and m.tool in local_tools for m in bench.measures):
        warm_pairs(bench, "seq_warm", [(local_tools, local, None)])  # rangefs failed before taking turns


def wait_saved(path: Path, size: int) -> None:
    """Until the last close has flushed the file: the warm rows measure a complete, saved cache
    (an open before that is served by rangefs rather than passed through)."""
    deadline = time.monotonic() + READ_TIMEOUT
    while int(os.getxattr(path, "user.rangefs.saved_bytes")) != size:
        if time.monotonic() > deadline:
            raise BenchError(f"{path.name} was not flushed within {READ_TIMEOUT:g} s of its last close")
        time.sleep(0.05)


def warm_runs(cfg: Config) -> int:
    """Runs of the warm rows: they take a second each, so twice the others' and one more."""
    return 2 * cfg.runs + 1


def warm_pairs(bench: Bench, case: str, readers: list[tuple[tuple[str, str], Path, Mount | None]]) -> None:
    """Each run, for each reader in an order shuffled run by run (seeded, as in ``measure``): drop
    the page cache and read its file, then read it again; two measures per reader.

    ``warm_runs`` runs, more than the other rows: a read after ``drop_caches`` on this VM now and
    then takes up to three times its usual time (0.6-1.3 s against 0.35-0.5 s), for a local ``dd``
    as for the mount, and the first one after the filling read mostly does (6 of 7). Of 35 such
    reads per tool in seven bench runs, 10 through the mount (6 of them first runs) and 5 of the
    local ``dd`` were slow, and a median of 5 runs went to the slow ones once (0.50x, 2026-12-07
    12:23), where the other two reads through the mount took what the local ``dd``'s did (0.38 s).
    """
    size = bench.data.big_size
    entries = []
    for tools, path, mnt in readers:
        dropped, kept = Measure(case, tools[0], size), Measure(case, tools[1], size)
        bench.measures += [dropped, kept]
        entries.append((dropped, kept, path, mnt))
    for i in range(warm_runs(bench.cfg)):
        order = list(entries)
        random.Random(i).shuffle(order)
        for dropped, kept, path, mnt in order:
            say(f"{case}: {dropped.tool} / {kept.tool} run {i + 1}")
            for m, drop in ((dropped, True), (kept, False)):
                if m.error:
                    continue
                try:
                    if drop:
                        bench.drop()
                    sample = dd_op(size)(path)
                    sample.peak_rss = mnt.peak_rss() if mnt else None
                    m.samples.append(sample)
                except BenchError as exc:
                    m.error = str(exc)


def case_random(bench: Bench) -> None:
    """RANDOM_READS cold 4 KiB preads at seeded offsets, each timed, in a child process."""
    data = bench.data
    measure(bench, "random4k", 0, [(tool, partial(cold_mount_run, bench, tool, bench.nginx.base_url, data.big,
                                                  random_op)) for tool in ("rangefs", "rclone")])


def random_op(path: Path) -> Sample:
    out = run([sys.executable, __file__, "--random-reads", str(path)], READ_TIMEOUT)
    latencies = json.loads(out.strip().splitlines()[-1])
    return Sample(sum(latencies), extra={
        "p50_ms": statistics.median(latencies) * 1000,
        "p90_ms": statistics.quantiles(latencies, n=10)[-1] * 1000,
        "max_ms": max(latencies) * 1000,
    })


def random_reads(path: Path) -> list[float]:
    """The child's job: one open fd, RANDOM_READS preads at 4 KiB-aligned seeded offsets, each timed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        blocks = os.fstat(fd).st_size // RANDOM_READ_SIZE
        rng = random.Random(RANDOM_SEED)
        latencies = []
        for _ in range(RANDOM_READS):
            offset = rng.randrange(blocks) * RANDOM_READ_SIZE
            start = time.perf_counter()
            if len(os.pread(fd, RANDOM_READ_SIZE, offset)) != RANDOM_READ_SIZE:
                raise OSError(f"short read at {offset}")
            latencies.append(time.perf_counter() - start)
        return latencies
    finally:
        os.close(fd)


def case_tool(bench: Bench, case: str, rel: str, argv_for: Callable[[Path], list[str]], count: bool = False) -> None:
    """A cold run of one command on one file of the mount, rangefs then rclone.

    After drop_caches the command is first run with ``-version`` (untimed, the mount untouched):
    loading ffprobe's libraries from disk took 290-500 ms, varying more from run to run than
    what either mount adds (~15-30 ms), so the timed run measures the file, not the tool's start.
    ``count``: also the bytes the command read (see ``counted``), and a row of rangefs with
    ``--direct-io``: without the kernel's readahead, which reads ahead of the decoder (not a target's row).
    """
    def op(path: Path) -> Sample:
        argv = argv_for(path)
        run([argv[0], "-version" if argv[0] in ("ffprobe", "ffmpeg") else "--version"], CMD_TIMEOUT)
        if count:
            seconds, read = counted(argv)
            return Sample(seconds, extra={"read": read})
        return Sample(timed(argv, CMD_TIMEOUT)[0])
    measure(bench, case, 0, [(tool, partial(cold_mount_run, bench, tool, bench.nginx.base_url, rel, op))
                             for tool in ("rangefs", *(["rangefs --direct-io"] if count else []), "rclone")])


def case_tail(bench: Bench) -> None:
    def argv(path: Path) -> list[str]:
        return ["tail", "-c", str(TAIL_BYTES), str(path)]
    case_tool(bench, "tail", bench.data.big, argv)


def case_ffprobe(bench: Bench) -> None:
    def argv(path: Path) -> list[str]:
        return ["ffprobe", "-v", "error", "-show_format", "-show_streams", str(path)]
    case_tool(bench, "ffprobe", bench.data.video, argv)


def case_seek(bench: Bench) -> None:
    middle = str(bench.data.video_seconds // 2)
    def argv(path: Path) -> list[str]:
        return ["ffmpeg", "-nostdin", "-v", "error", "-ss", middle, "-t", str(SEEK_SECONDS), "-i", str(path),
                "-f", "null", "-"]
    case_tool(bench, "seek", bench.data.video, argv, count=True)


def case_player(bench: Bench) -> None:
    """A player that jumps to four places of the movie and plays PLAYER_SECONDS at each, in real
    time (``ffmpeg -re``): one ffmpeg per jump on one cold mount, as a player that reopens
    the file at each seek; times, bytes read and bytes fetched summed over the four."""
    data = bench.data
    seconds = MOVIE_SECONDS

    def op(path: Path) -> Sample:
        run(["ffmpeg", "-version"], CMD_TIMEOUT)
        total, read = 0.0, 0
        for where in PLAYER_JUMPS:
            took, got = counted(["ffmpeg", "-nostdin", "-v", "error", "-re", "-ss", str(int(seconds * where)),
                                 "-t", str(PLAYER_SECONDS), "-i", str(path), "-f", "null", "-"])
            total, read = total + took, read + got
        return Sample(total, extra={"read": read})
    measure(bench, "player", 0, [(tool, partial(cold_mount_run, bench, tool, bench.nginx.base_url, data.movie, op))
                                 for tool in ("rangefs", "rangefs --direct-io", "rclone")])


CASE_FUNCS: dict[str, Callable[[Bench], None]] = {
    "seq_cold": lambda b: case_seq(b, "seq_cold", b.nginx.base_url),
    "seq_warm": case_seq_warm,
    "random4k": case_random,
    "tail": case_tail,
    "ffprobe": case_ffprobe,
    "seek": case_seek,
    "seq_rtt": case_seq_rtt,
    "proxy": case_proxy,
    "player": case_player,
    "capped": case_capped,
}


# -- reporting ----------------------------------------------------------------------------------


def case_label(case: str, data: Data, cfg: Config) -> str:
    size = f"{data.big_size // MiB} MiB" if data.big_size < 1 << 30 else f"{data.big_size >> 30} GiB"
    return {
        "seq_cold": f"cold sequential read, {size} (dd bs=1M)",
        "seq_warm": f"warm sequential read, {size} (2nd read, dd bs=1M)",
        "random4k": f"{RANDOM_READS} cold random 4 KiB preads (per-read latency)",
        "tail": f"tail -c {TAIL_BYTES}, cold",
        "ffprobe": f"ffprobe of the {data.video_seconds} s MP4, cold",
        "seek": f"ffmpeg -ss {data.video_seconds // 2} -t {SEEK_SECONDS} (seek + decode), cold",
        "seq_rtt": f"cold sequential read, +{cfg.rtt_ms:g} ms RTT (proxy)",
        "proxy": "proxy check: curl -o /dev/null, source in page cache",
        "capped": f"cold sequential read, {data.capped_size // MiB} MiB, nginx limit_rate {CAPPED_RATE} (per request)",
        "capped_proxy": f"cold sequential read, {data.capped_size // MiB} MiB, "
                        f"{CAPPED_PROXY_RATE // MiB} MiB/s per connection over time (proxy)",
        "player": f"player: 4 jumps into a {data.movie_size / MB:.0f} MB movie, {PLAYER_SECONDS} s played "
                  "at each (ffmpeg -re), cold",
    }[case]


def reference(case: str, tool: str) -> str | None:
    """The measure a row is compared against: rangefs's, in the ratio column."""
    if case == "seq_warm":
        return {"local dd, page cache dropped": "rangefs, page cache dropped",
                "local dd, page cache kept": "rangefs, page cache kept"}.get(tool)
    if case == "proxy":
        return "curl via proxy (0 ms)" if tool == "curl direct" else None
    return None if tool == "rangefs" else "rangefs"


def find(measures: list[Measure], case: str, tool: str) -> Measure | None:
    return next((m for m in measures if m.case == case and m.tool == tool), None)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def fmt_ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} ms"


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "—"
    if value < MiB:
        return f"{value / 1024:.1f} KiB"
    return f"{value / MiB:.1f} MiB"


def fmt_mb(value: float | None) -> str:
    return "—" if value is None else f"{value / MB:.0f} MB"


def ratio_text(m: Measure, ref: Measure | None) -> str:
    """rangefs ÷ this row: MB/s for throughput, else latency or time, and bytes fetched."""
    if ref is None or ref.error or m.error or not ref.samples or not m.samples:
        return "—"
    if m.case == "proxy":
        return f"proxy ÷ direct {fmt_ratio(ratio(ref.mbps(), m.mbps()))} MB/s"
    if m.size:
        return f"{fmt_ratio(ratio(ref.mbps(), m.mbps()))} MB/s"
    bytes_part = f"bytes {fmt_ratio(ratio(ref.median('fetched'), m.median('fetched')))}"
    if m.case == "random4k":
        return f"p50 {fmt_ratio(ratio(ref.median('p50_ms'), m.median('p50_ms')))}, {bytes_part}"
    return f"time {fmt_ratio(ratio(ref.median('seconds'), m.median('seconds')))}, {bytes_part}"


def time_text(m: Measure) -> str:
    if m.case == "random4k":
        p50, p90 = m.median("p50_ms"), m.median("p90_ms")
        return f"p50 {p50:.2f} ms, p90 {p90:.2f} ms" if p50 is not None and p90 is not None else "—"
    return fmt_seconds(m.median("seconds"))


def table_row(m: Measure, measures: list[Measure], label: str) -> str:
    if not m.samples:
        reason = f"**FAILED**: {m.error.replace('|', '/')}" if m.error else "not measured (interrupted)"
        cells = [label, m.tool, "0", reason, *["—"] * 6]
    else:
        ref_tool = reference(m.case, m.tool)
        ref = find(measures, m.case, ref_tool) if ref_tool else None
        mbps = m.mbps()
        cells = [label, m.tool, str(len(m.samples)), time_text(m), "—" if mbps is None else f"{mbps:.0f}",
                 fmt_bytes(m.median("read")), fmt_bytes(m.median("fetched")), _fmt_int(m.median("gets")),
                 fmt_mb(m.median("peak_rss")),
                 ratio_text(m, ref)]
        if m.error:
            cells[3] += f" (then failed: {m.error.replace('|', '/')})"
    return "| " + " | ".join(cells) + " |"


def _fmt_int(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def results_table(bench: Bench) -> list[str]:
    lines = ["| case | tool | runs | time (median) | MB/s | read by the tool | fetched from nginx | GETs | peak RSS "
             "| rangefs ÷ this |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    last_case = ""
    for m in bench.measures:
        label = case_label(m.case, bench.data, bench.cfg) if m.case != last_case else ""
        last_case = m.case
        lines.append(table_row(m, bench.measures, label))
    return lines


# -- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    text: str
    measured: str
    passed: bool | None  # None: not measured


def targets(bench: Bench) -> list[Target]:
    ms, rtt = bench.measures, bench.cfg.rtt_ms
    out = [
        throughput_target(ms, "seq_cold", "rclone", 2.0, "cold sequential ≥ 2x rclone --vfs-cache-mode full"),
        throughput_target(ms, "seq_cold", "curl -o FILE", 0.9, "cold sequential ≥ 0.9x curl -o FILE"),
        throughput_target(ms, "seq_rtt", "curl -o FILE", 0.8, f"cold sequential, +{rtt:g} ms RTT, ≥ 0.8x curl -o FILE"),
        throughput_target(ms, "seq_warm", "local dd, page cache dropped", 0.9,
                          "warm sequential, page cache dropped, ≥ 0.9x local dd", "rangefs, page cache dropped"),
        throughput_target(ms, "seq_warm", "local dd, page cache kept", 0.8,
                          "warm sequential, page cache kept, ≥ 0.8x local dd", "rangefs, page cache kept"),
        cost_target(ms, "random4k", "p50_ms", 0.3, "random 4 KiB cold: median latency ≤ 0.3x rclone"),
        cost_target(ms, "random4k", "fetched", 0.5, "random 4 KiB cold: bytes fetched ≤ 0.5x rclone"),
        tail_target(ms, bench.cfg.rangefs_block),
        cost_target(ms, "ffprobe", "fetched", 0.3, "ffprobe: bytes fetched ≤ 0.3x rclone"),
        cost_target(ms, "ffprobe", "seconds", 1.0, "ffprobe: time ≤ rclone"),
        cost_target(ms, "seek", "fetched", 0.3, "seek + decode: bytes fetched ≤ 0.3x rclone"),
        cost_target(ms, "seek", "seconds", 1.0, "seek + decode: time ≤ rclone"),
        read_target(ms, "seek", 2.0, "seek + decode: bytes fetched ≤ 2x what ffmpeg read"),
        cost_target(ms, "player", "fetched", 0.3, "player, 4 jumps: bytes fetched ≤ 0.3x rclone"),
        cost_target(ms, "player", "seconds", 1.0, "player, 4 jumps: time ≤ rclone"),
        read_target(ms, "player", 2.0, "player, 4 jumps: bytes fetched ≤ 2x what ffmpeg read"),
        rss_target(ms),
        throughput_target(ms, "capped", ARIA2, 1.0, f"capped (limit_rate {CAPPED_RATE}) cold sequential ≥ {ARIA2}"),
        throughput_target(ms, "capped_proxy", ARIA2, 1.0,
                          f"capped ({CAPPED_PROXY_RATE // MiB} MiB/s per connection, proxy) cold sequential ≥ {ARIA2}"),
    ]
    return out


def _usable(m: Measure | None) -> bool:
    return m is not None and bool(m.samples) and not m.error


def _missing(*measures: Measure | None) -> str:
    for m in measures:
        if m is None:
            return "not run"
        if m.error or not m.samples:
            return f"{m.tool} failed"
    return "not measured"


def throughput_target(ms: list[Measure], case: str, peer: str, minimum: float, text: str,
                      own: str = "rangefs") -> Target:
    a, b = find(ms, case, own), find(ms, case, peer)
    if not (_usable(a) and _usable(b)):
        return Target(text, _missing(a, b), None)
    assert a is not None and b is not None
    value = ratio(a.mbps(), b.mbps())
    measured = f"{fmt_ratio(value)} ({a.mbps():.0f} vs {b.mbps():.0f} MB/s)"
    if case == "seq_rtt" and _usable(null := find(ms, case, "curl -o /dev/null")):
        measured += f"; vs curl -o /dev/null {fmt_ratio(ratio(a.mbps(), null.mbps()))}"  # type: ignore[union-attr]
    return Target(text, measured, value is not None and value >= minimum)


def cost_target(ms: list[Measure], case: str, name: str, maximum: float, text: str) -> Target:
    a, b = find(ms, case, "rangefs"), find(ms, case, "rclone")
    if not (_usable(a) and _usable(b)):
        return Target(text, _missing(a, b), None)
    assert a is not None and b is not None
    va, vb = a.median(name), b.median(name)
    value = ratio(va, vb)
    show: Callable[[float | None], str] = {"fetched": fmt_bytes, "seconds": fmt_seconds, "p50_ms": fmt_ms}[name]
    measured = f"{fmt_ratio(value)} ({show(va)} vs {show(vb)})"
    if value is None:  # rclone fetched nothing: only zero passes
        return Target(text, measured, va == 0)
    return Target(text, measured, value <= maximum)


def read_target(ms: list[Measure], case: str, maximum: float, text: str) -> Target:
    """rangefs's bytes fetched against the bytes the tool read through it (medians)."""
    m = find(ms, case, "rangefs")
    if m is None or not _usable(m):
        return Target(text, _missing(m), None)
    fetched, read = m.median("fetched"), m.median("read")
    value = ratio(fetched, read)
    return Target(text, f"{fmt_ratio(value)} ({fmt_bytes(fetched)} vs {fmt_bytes(read)})",
                  value is not None and value <= maximum)


def tail_target(ms: list[Measure], block: int) -> Target:
    text = f"tail -c {TAIL_BYTES}: one GET, ≤ 1 block ({block // 1024} KiB) fetched"
    m = find(ms, "tail", "rangefs")
    if m is None or not _usable(m):
        return Target(text, _missing(m), None)
    gets, fetched = max(s.gets or 0 for s in m.samples), max(s.fetched or 0 for s in m.samples)
    return Target(text, f"{gets} GET(s), {fmt_bytes(fetched)} (worst run)", gets == 1 and fetched <= block)


def rss_target(ms: list[Measure]) -> Target:
    text = "daemon peak RSS ≤ 200 MB while streaming the big file"
    m = find(ms, "seq_cold", "rangefs")
    values = [s.peak_rss for s in m.samples if s.peak_rss is not None] if m else []
    if not values:
        return Target(text, _missing(m), None)
    return Target(text, f"{fmt_mb(max(values))} (max VmHWM over the cold sequential runs)", max(values) <= 200 * MB)


def targets_table(items: list[Target]) -> list[str]:
    lines = ["| target (issue 3) | measured | result |", "| --- | --- | --- |"]
    for t in items:
        result = "n/a" if t.passed is None else ("PASS" if t.passed else "MISS")
        lines.append(f"| {t.text} | {t.measured} | {result} |")
    return lines


# -- machine facts and output -------------------------------------------------------------------


def version(argv: list[str], pattern: str = r"\S+") -> str:
    try:
        out = run(argv, timeout=20)
    except BenchError:
        return "not available"
    first = out.strip().splitlines()[0] if out.strip() else ""
    found = re.search(pattern, first)
    return found.group(0) if found else first


def machine_facts() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version
    try:
        rangefs_version = package_version("rangefs")
    except PackageNotFoundError:
        rangefs_version = "?"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30):.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": version(["nginx", "-v"], r"nginx/\S+"),
        "curl": version(["curl", "--version"], r"curl \S+"),
        "rclone": version(["rclone", "version"], r"rclone \S+"),
        "ffmpeg": version(["ffmpeg", "-version"], r"ffmpeg version \S+"),
        "rangefs": rangefs_version,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def header(bench: Bench, facts: dict[str, str], command: str) -> list[str]:
    cfg, data = bench.cfg, bench.data
    if bench.drop_error is None:
        drop = "yes: cold runs start with `sync; echo 3 > /proc/sys/vm/drop_caches` and a fresh cache dir"
    else:
        drop = (f"**NO** ({bench.drop_error}): cold runs have a fresh cache dir only, the page cache is "
                "NOT dropped, so the cold and page-cache-dropped rows are warmer than they claim")
    return [
        f"`{command}`",
        "",
        f"- machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']} RAM, Linux {facts['kernel']}",
        f"- versions: Python {facts['python']}, {facts['nginx']}, {facts['curl']}, {facts['rclone']}, "
        f"{facts['ffmpeg']}, rangefs {facts['rangefs']} (block size {cfg.rangefs_block // 1024} KiB)",
        f"- page cache dropped for cold runs: {drop}",
        f"- data: {fmt_bytes(data.big_size)} random file, {data.video_size / MB:.1f} MB MP4 ({data.video_seconds} s, "
        f"index at the end), nginx on 127.0.0.1; up to {cfg.runs} run(s) per row "
        f"({warm_runs(cfg)} for the warm rows), medians shown",
        "- MB/s and MB are 10^6 bytes; fetched = body bytes nginx logged for the file's GETs from the measured "
        "command until the unmount; peak RSS = VmHWM of the rangefs daemon + its fetch process / of the rclone "
        "process, read just before unmount",
        "- rclone: `rclone mount :http: MNT --http-url URL --vfs-cache-mode full --cache-dir DIR` (nginx autoindex)",
        "- rangefs ÷ this: for MB/s above 1 means rangefs is faster; for time, latency and bytes below 1 means "
        "rangefs is faster / fetches less",
    ]


def notes(bench: Bench) -> list[str]:
    out = [f"- {m.case} / {m.tool}: {m.note}" for m in bench.measures if m.note]
    return ["", "Notes:", *out] if out else []


def write_json(bench: Bench, facts: dict[str, str], command: str, items: list[Target], elapsed: float) -> Path:
    results = REPO / "results"
    results.mkdir(exist_ok=True)
    path = results / f"bench-{datetime.now():%Y%m%d-%H%M%S}.json"
    doc = {
        "command": command,
        "elapsed_s": round(elapsed, 1),
        "machine": facts,
        "drop_caches": bench.drop_error or "ok",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(bench.cfg).items()},
        "data": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(bench.data).items()},
        "measures": [_measure_json(m) for m in bench.measures],
        "targets": [asdict(t) for t in items],
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _measure_json(m: Measure) -> dict[str, object]:
    doc = asdict(m)
    doc["median"] = {name: m.median(name) for name in ("seconds", "fetched", "gets", "peak_rss", "p50_ms", "p90_ms",
                                                      "cpu_s", "read")}
    doc["mb_per_s"] = m.mbps()
    return doc


def report(bench: Bench, command: str, elapsed: float, stopped: str) -> None:
    facts = machine_facts()
    items = targets(bench)
    incomplete = [f"**Incomplete run: {stopped}.**", ""] if stopped else []
    lines = ["## rangefs benchmark", "", *incomplete, *header(bench, facts, command), "", *results_table(bench),
             *notes(bench), "", *targets_table(items), "", f"Whole run: {elapsed / 60:.1f} min."]
    print("\n".join(lines), flush=True)
    say(f"full data: {write_json(bench, facts, command, items, elapsed)}")


# -- main -------------------------------------------------------------------------------------


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def run_cases(bench: Bench) -> None:
    for case in bench.cfg.cases:
        try:
            CASE_FUNCS[case](bench)
        except BenchError as exc:  # a whole case could not be set up (e.g. the proxy)
            bench.measures.append(Measure(case, "(case)", 0, error=str(exc)))
            say(f"{case} failed: {exc}")


def child_random_reads(argv: list[str]) -> int:
    try:
        print(json.dumps(random_reads(Path(argv[1]))))
    except OSError as exc:
        print(f"random reads: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--random-reads"]:
        return child_random_reads(argv)
    cfg = parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO))
                          else sys.executable, os.path.relpath(__file__, REPO), *argv])
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGHUP, _raise_interrupted)
    started = time.monotonic()
    nginx: Nginx | None = None
    bench: Bench | None = None
    code, message = 0, ""
    try:
        data = prepare_data(cfg)
        (cfg.work_dir / "nginx").mkdir(exist_ok=True)
        nginx = Nginx(cfg.work_dir / "nginx", data.www, autoindex=True, slow_rate=CAPPED_RATE)
        nginx.start()
        bench = Bench(cfg, data, nginx)
        run_cases(bench)
    except (BenchError, RuntimeError, OSError) as exc:
        code, message = 1, (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    except Interrupted as exc:
        code, message = 128 + int(exc.args[0]), f"interrupted by {signal.Signals(exc.args[0]).name}"
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not abort the clean-up
        if bench is not None:
            bench.clean_up()
        if nginx is not None:
            nginx.stop()
    if bench is not None and bench.measures:
        report(bench, command, time.monotonic() - started, message)
    if code:
        say(f"{message}; cleaned up")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
