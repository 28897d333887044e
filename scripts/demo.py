"""A guided tour of rangefs: mount files served by a local nginx and use them like local files.

The demo generates sample files (64 MiB of seeded random bytes, a numbered text file, a file with a
unicode name in a subdirectory, a 10 s MP4 whose index sits at the end), serves them with nginx on
127.0.0.1, mounts them with ``rangefs mount`` and runs ordinary tools on the mount: ls, tail, od,
cp + cmp, sha256sum, ffprobe. Between steps it reads nginx's access log to show what crossed the
network: ``tail`` fetches one block, not the whole file; a full ``cp`` fetches the file once; after
an unmount and a remount the same ``cp`` is served from the on-disk cache (only HEAD requests reach
nginx). Everything lives in a fresh temporary directory that is removed at the end, also on failure
or Ctrl-C. Run it with ``make demo`` or ``.venv/bin/python scripts/demo.py``.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from rangefs.cache import DEFAULT_BLOCK_SIZE as BLOCK_SIZE  # noqa: E402

from nginx import Nginx  # noqa: E402  (the test suite's nginx helper)

RANGEFS = str(Path(sys.executable).parent / "rangefs")  # the CLI of this very venv
MiB = 1 << 20
BIG_SIZE = 64 * MiB
CHUNK = 4 * MiB
TEXT_LINES = 500
LS_MAX_LINES = 16
COMMAND_TIMEOUT = 120.0  # seconds for any one command
UNMOUNT_TIMEOUT = 30.0

# Where each sample file lives under www/, and where it appears in the mount.
BIG = "random-64M.bin"
TEXT = "numbers.txt"
UNICODE = "docs/café menu.txt"
VIDEO = "clip.mp4"
MOUNT_PATHS = {BIG: BIG, TEXT: TEXT, UNICODE: UNICODE, VIDEO: "videos/clip.mp4"}


class DemoError(Exception):
    """An expected failure: its message is the one line to show."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwind through the cleanup like Ctrl-C does."""


# -- output and commands ----------------------------------------------------------------------


def say(text: str) -> None:
    print(f"# {text}", flush=True)


def show(argv: Sequence[str], suffix: str = "") -> None:
    print("$ " + shlex.join(argv) + suffix, flush=True)


def execute(
    argv: Sequence[str], cwd: Path, stdin: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """Run a command quietly and return what it wrote; raise DemoError when it fails (and check)."""
    try:
        done = subprocess.run(list(argv), cwd=cwd, input=stdin, capture_output=True, timeout=COMMAND_TIMEOUT)
    except FileNotFoundError:
        raise DemoError(f"command not found: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise DemoError(f"'{shlex.join(argv)}' did not finish within {COMMAND_TIMEOUT:.0f}s") from None
    if check and done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise DemoError(f"'{shlex.join(argv)}' failed: {reason}")
    return done


def run(argv: Sequence[str], cwd: Path, stdin: bytes | None = None) -> str:
    """Run a command quietly; return its stdout as text."""
    return execute(argv, cwd, stdin).stdout.decode(errors="replace")


def step(argv: Sequence[str], cwd: Path, max_lines: int = 0) -> str:
    """Show a command, run it, print its output (at most max_lines lines when max_lines > 0)."""
    show(argv)
    out = run(argv, cwd)
    print_lines(out.splitlines(), max_lines)
    return out


def print_lines(lines: list[str], max_lines: int = 0) -> None:
    if max_lines and len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], f"... ({len(lines) - max_lines + 1} more lines)"]
    for line in lines:
        print(line)
    sys.stdout.flush()


def size_text(n: int, exact: bool = True) -> str:
    """1234567 -> '1.2 MiB (1234567 bytes)', or just '1.2 MiB' when not exact."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" + (f" ({n} bytes)" if exact else "")
    return f"{n} bytes"


# -- sample files ---------------------------------------------------------------------------


def generate(www: Path) -> None:
    """Write the four sample files into www/."""
    start = time.monotonic()
    rng = random.Random(42)
    with open(www / BIG, "wb") as f:
        for _ in range(BIG_SIZE // CHUNK):
            f.write(rng.randbytes(CHUNK))
    (www / TEXT).write_text("".join(f"line {i:03d}: rangefs reads this file by HTTP range\n"
                                    for i in range(1, TEXT_LINES + 1)))
    (www / UNICODE).parent.mkdir(parents=True)
    (www / UNICODE).write_text("Plat du jour: crêpes, café au lait\nPrix: 9,50 €\n", encoding="utf-8")
    make_video(www / VIDEO)
    sizes = ", ".join(f"{rel} {size_text((www / rel).stat().st_size, exact=False)}" for rel in MOUNT_PATHS)
    say(f"generated in www/ ({time.monotonic() - start:.1f} s): {sizes}")


def make_video(path: Path) -> None:
    """10 s of test pattern and a tone; no +faststart, so the MP4 index (moov) is at the end."""
    run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", "testsrc=duration=10:size=320x240:rate=25",
         "-f", "lavfi", "-i", "sine=frequency=440:duration=10",
         "-c:v", "mpeg4", "-q:v", "5", "-c:a", "aac", "-shortest", "-f", "mp4", str(path)], path.parent)


def write_url_list(path: Path, nginx: Nginx) -> None:
    lines = ["# rangefs URL list: URL [PATH in the mount]; spaces in a PATH are written %20"]
    for rel, mount_path in MOUNT_PATHS.items():
        lines.append(f"{nginx.url(rel)} {mount_path.replace(' ', '%20')}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# -- mounting -------------------------------------------------------------------------------


def is_mounted(mountpoint: Path) -> bool:
    """Whether something is mounted exactly at mountpoint (also a FUSE mount whose daemon died)."""
    target = os.path.abspath(mountpoint)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and _unescape(fields[4]) == target:
            return True
    return False


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def run_uninterrupted(argv: Sequence[str], cwd: Path) -> None:
    """Show and run a mount or unmount to its end, also when Ctrl-C interrupts the demo meanwhile.

    The command runs in its own session, so Ctrl-C does not reach it; were it cut short, its
    daemon could mount after the clean-up has looked, or still be saving into the cache dir
    that the clean-up removes.
    """
    show(argv)
    try:
        proc = subprocess.Popen(list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except FileNotFoundError:
        raise DemoError(f"command not found: {argv[0]}") from None
    try:
        _, err = proc.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise DemoError(f"'{shlex.join(argv)}' did not finish within {COMMAND_TIMEOUT:.0f}s") from None
    except BaseException:
        proc.wait(COMMAND_TIMEOUT)
        raise
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise DemoError(lines[-1] if lines else f"'{shlex.join(argv)}' failed: exit status {proc.returncode}")


def mount(work: Path) -> None:
    run_uninterrupted([RANGEFS, "mount", "urls.txt", "mnt", "--cache-dir", "cache"], work)
    if not is_mounted(work / "mnt"):
        raise DemoError("'rangefs mount' returned, but nothing is mounted at mnt")


def unmount(work: Path) -> None:
    run_uninterrupted([RANGEFS, "unmount", "mnt"], work)
    if is_mounted(work / "mnt"):
        raise DemoError("'rangefs unmount' returned, but mnt is still mounted")


def force_unmount(mountpoint: Path) -> None:
    """Cleanup: rangefs unmount, else a lazy fusermount3 -u -z. Never raises."""
    for argv in ([RANGEFS, "unmount", str(mountpoint), "--timeout", str(UNMOUNT_TIMEOUT)],
                 ["fusermount3", "-u", "-z", str(mountpoint)]):
        if not is_mounted(mountpoint):
            return
        try:
            subprocess.run(argv, capture_output=True, timeout=UNMOUNT_TIMEOUT + 5)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if is_mounted(mountpoint):
        print(f"demo: warning: could not unmount {mountpoint}", file=sys.stderr)


# -- the tour -------------------------------------------------------------------------------


def show_files(work: Path, nginx: Nginx) -> None:
    step(["ls", "-lR", "mnt"], work, LS_MAX_LINES)
    step(["tail", "-n", "3", f"mnt/{TEXT}"], work)
    tail = ["tail", "-c", "64", f"mnt/{BIG}"]
    od = ["od", "-A", "d", "-t", "x1"]
    show(tail, " | " + shlex.join(od))
    print_lines(run(od, work, stdin=execute(tail, work).stdout).splitlines())
    gets = [r for r in nginx.requests() if r.method == "GET" and r.path == "/" + BIG]
    say(f"nginx sent {size_text(sum(r.body_bytes for r in gets))} of {BIG} in {len(gets)} ranged GET(s) "
        f"so far: the block tail read, not {BIG_SIZE // MiB} MiB")


def copy_and_compare(work: Path, copy: str) -> float:
    """cp the big file out of the mount, check it against the original; return the cp's seconds."""
    argv = ["cp", f"mnt/{BIG}", copy]
    show(argv)
    start = time.monotonic()
    run(argv, work)
    elapsed = time.monotonic() - start
    cmp = ["cmp", f"www/{BIG}", copy]
    show(cmp, " && echo identical")
    done = execute(cmp, work, check=False)
    if done.returncode != 0:
        raise DemoError(f"the copy is not the original: {(done.stdout + done.stderr).decode().strip()}")
    print("identical")
    return elapsed


def probe_video(work: Path, nginx: Nginx) -> None:
    argv = ["ffprobe", "-hide_banner", f"mnt/{MOUNT_PATHS[VIDEO]}"]
    pattern = "Input|Duration|Stream"
    show(argv, f" 2>&1 | grep -E '{pattern}'")
    done = execute(argv, work)
    output = (done.stdout + done.stderr).decode(errors="replace")
    print_lines([line for line in output.splitlines() if re.search(pattern, line)])
    size = (work / "www" / VIDEO).stat().st_size
    gets = [r for r in nginx.requests() if r.method == "GET" and r.path == "/" + VIDEO]
    blocks = -(-size // BLOCK_SIZE)
    say(f"ffprobe seeks to the index at the end of the MP4: {len(gets)} ranged GET(s), "
        f"{size_text(sum(r.body_bytes for r in gets))} sent (the file is only {blocks} cache blocks)")


def total_report(www: Path, nginx: Nginx) -> None:
    total = sum((www / rel).stat().st_size for rel in MOUNT_PATHS)
    reused = "; cp reused the block tail had fetched" if nginx.bytes_sent(BIG) == BIG_SIZE else ""
    say(f"in all nginx served {size_text(nginx.bytes_sent())} for files totalling {size_text(total)}{reused}")


def cache_report(nginx: Nginx, since: int, first: float, second: float) -> None:
    reqs = nginx.requests(since)
    methods = ", ".join(f"{sum(r.method == m for r in reqs)} {m}" for m in sorted({r.method for r in reqs}))
    sent = sum(r.body_bytes for r in reqs)
    say(f"since the remount nginx saw {len(reqs)} requests ({methods or 'none'}) and sent "
        f"{size_text(sent)}: served from cache (cp took {second:.1f} s, first time {first:.1f} s)")
    if any(r.method == "GET" and r.path == "/" + BIG for r in reqs):
        raise DemoError(f"the second cp fetched {BIG} from nginx again instead of reading the cache")


def tour(work: Path, nginx: Nginx) -> None:
    www = work / "www"
    write_url_list(work / "urls.txt", nginx)
    say(f"nginx serves www/ at {nginx.base_url}; rangefs mounts the URLs listed in urls.txt")
    step(["cat", "urls.txt"], work)
    mount(work)
    show_files(work, nginx)
    first = copy_and_compare(work, "copy1.bin")
    step(["sha256sum", f"www/{BIG}", "copy1.bin"], work)
    probe_video(work, nginx)
    total_report(www, nginx)
    say("unmount and mount again: the cache in cache/ survives")
    unmount(work)
    mark = nginx.mark()
    mount(work)
    second = copy_and_compare(work, "copy2.bin")
    cache_report(nginx, mark, first, second)
    unmount(work)


# -- set-up and clean-up --------------------------------------------------------------------


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@dataclass
class Resources:
    """What the clean-up has to undo."""

    work: Path | None = None
    nginx: Nginx | None = None


def demo(res: Resources) -> None:
    res.work = work = Path(tempfile.mkdtemp(prefix="rangefs-demo-"))
    for name in ("www", "mnt", "cache", "nginx"):
        (work / name).mkdir()
    say(f"rangefs demo in {work} (removed at the end)")
    show(["cd", str(work)])
    generate(work / "www")
    res.nginx = Nginx(work / "nginx", work / "www")
    res.nginx.start()
    tour(work, res.nginx)


def clean_up(res: Resources) -> None:
    """Unmount, stop nginx, remove the work directory; whatever happened before."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not abort the clean-up
    if res.work is not None:
        force_unmount(res.work / "mnt")
    if res.nginx is not None:
        res.nginx.stop()
    if res.work is None:
        return
    if is_mounted(res.work / "mnt"):
        print(f"demo: warning: left {res.work} in place: mnt is still mounted", file=sys.stderr)
    else:
        shutil.rmtree(res.work, ignore_errors=True)


def main() -> int:
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGHUP, _raise_interrupted)
    res = Resources()
    code, message = 0, ""
    try:
        demo(res)
    except DemoError as exc:
        code, message = 1, f"error: {exc}"
    except (RuntimeError, OSError) as exc:  # nginx would not start, a file could not be written
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        detail = f" {lines[-1].strip()}" if len(lines) > 1 else ""
        code, message = 1, f"error: {lines[0]}{detail}"
    except KeyboardInterrupt:
        code, message = 128 + signal.SIGINT, "interrupted"
    except Interrupted as exc:
        code, message = 128 + int(exc.args[0]), f"interrupted by {signal.Signals(exc.args[0]).name}"
    finally:
        clean_up(res)
    if code:
        print(f"demo: {message}; cleaned up", file=sys.stderr)
    else:
        say("unmounted, stopped nginx, removed the work directory")
    return code


if __name__ == "__main__":
    sys.exit(main())
