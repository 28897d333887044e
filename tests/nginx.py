"""A real nginx on 127.0.0.1 for the test suite and the benchmark; standard library only.

``Nginx(root_dir, www_dir)`` writes its own config into ``root_dir``, runs nginx in the
foreground as a child process and reads back its access log. Locations served:

    /<rel>          static files from www_dir (strong ETag, Last-Modified, Range, If-Range)
    /slow/<rel>     the same files, sent at ``slow_rate`` bytes/s per connection (nginx syntax,
                    e.g. "4m"), so a test can interrupt a transfer mid-way
    /nohead/<rel>   the same files, but HEAD answers 405; GET (with Range) works
    /auth/<rel>     the same files, but 401 without ``Authorization: Bearer AUTH_TOKEN`` (or Basic
                    AUTH_LOGIN:AUTH_TOKEN)
    /.nginx-helper-ready   the readiness and log-sync probe, not logged (see below)
    anything else   a missing file is a plain 404 from "/", e.g. /missing/x

With ``autoindex=True`` a directory URL under "/" answers nginx's HTML listing with exact sizes
(rclone's http backend needs it); by default a directory answers 403, as nginx does.

limit_rate lets the first second's worth (``slow_rate`` bytes) out at once, and what nginx counts
as sent includes what sits in the socket buffers (up to a few MiB on loopback); so a transfer
interrupted on /slow/ stops short only when the file is well above ``slow_rate`` plus those.
The probe answers a per-instance token, so start() cannot mistake another listener for nginx.

The access log is unbuffered, but nginx writes a record just after the last byte reaches the
socket, so a client can hold a whole response before its record exists. ``requests()`` and
``mark()`` therefore first send an unlogged request and wait for its answer: the one worker is
single-threaded and logs in the same step as the final write, so by then every response a client
has received is logged. When a client closes early nginx still logs the body bytes it actually
sent, but only once it notices (at its next write); poll for that record.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, unquote

from procs import children

NGINX_BIN = shutil.which("nginx") or "/usr/sbin/nginx"
START_TIMEOUT = 10.0  # seconds for nginx to accept connections
STOP_TIMEOUT = 10.0  # seconds for the master to exit after SIGTERM before SIGKILL
SYNC_TIMEOUT = 10.0  # seconds for the log-sync probe; generous, the worker may be busy with a benchmark
POLL_INTERVAL = 0.05
PORT_ATTEMPTS = 5  # a port picked with port=0 may be taken before nginx binds it
AUTH_TOKEN = "rangefs-test-secret-4f9c"  # what /auth/ asks for; tests grep for it where it must not be
AUTH_LOGIN = "rangefs"
LOG_FIELDS = (
    "$request_method", "$request_uri", "$status", "$body_bytes_sent", "$http_range", "$http_if_range",
    "$msec", "$request_time", "$connection",
)


@dataclass(frozen=True)
class Request:
    """One access-log record."""

    method: str
    path: str  # percent-decoded request path, without the query
    status: int
    body_bytes: int  # $body_bytes_sent: what was really sent, also when the client hung up
    range: str  # the Range request header, "" when absent
    if_range: str  # the If-Range request header, "" when absent
    end: float  # $msec: when the record was written (the response's end), seconds since the epoch
    seconds: float  # $request_time: from the request's first byte read to the record, ms resolution
    connection: int  # $connection: the connection's serial number (the same for a keep-alive's requests)

    @property
    def start(self) -> float:
        """When the request's first byte was read (ms resolution)."""
        return self.end - self.seconds


class Nginx:
    """An nginx master (1 worker) serving ``www_dir`` on 127.0.0.1; see the module docstring."""

    def __init__(
        self, root_dir: Path, www_dir: Path, port: int = 0, slow_rate: str = "4m", autoindex: bool = False
    ) -> None:
        """Prepare, but do not start, an nginx whose conf, logs, pid and temp dirs live in root_dir.

        Raises:
            ValueError: a path that cannot be written into an nginx config string.
        """
        self.root_dir = Path(root_dir).resolve()
        self.www_dir = Path(www_dir).resolve()
        for path in (self.root_dir, self.www_dir):
            if any(c in str(path) for c in '"\\$'):  # nginx expands $ even inside quotes
                raise ValueError(f"unsupported character in path {path}")
        self.slow_rate = slow_rate
        self.autoindex = autoindex
        self.port = port
        self._fixed_port = port != 0
        self._proc: subprocess.Popen[bytes] | None = None
        self.conf_path = self.root_dir / "nginx.conf"
        self.access_log = self.root_dir / "access.log"
        self.error_log = self.root_dir / "error.log"
        self._stderr_path = self.root_dir / "nginx.stderr"
        self._token = secrets.token_hex(8)  # answered by the readiness location
        self._records: list[Request] = []  # the access log parsed up to _log_offset
        self._log_offset = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The master's pid while started, else None."""
        return self._proc.pid if self._proc is not None else None

    def url(self, rel: str) -> str:
        """The URL of ``rel`` (a "/"-separated path under the server root), each component quoted."""
        return self.base_url + "/" + "/".join(quote(part, safe="") for part in rel.split("/"))

    def start(self) -> None:
        """Start nginx and wait until it accepts connections.

        Raises:
            RuntimeError: nginx did not come up within START_TIMEOUT; carries its stderr/error.log tail.
        """
        if self._proc is not None:
            raise RuntimeError("nginx already started")
        attempts = 1 if self._fixed_port else PORT_ATTEMPTS
        for attempt in range(attempts):
            if not self._fixed_port:
                self.port = _free_port()
            error = self._start_once()
            if error is None:
                return
            self.stop()
            if "Address already in use" not in error or attempt == attempts - 1:
                raise RuntimeError(f"nginx did not start on port {self.port}:\n{error}")

    def stop(self) -> None:
        """Stop the master we started (SIGTERM, then SIGKILL after STOP_TIMEOUT); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # fast shutdown: SIGQUIT would wait for slow transfers
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            workers = children(proc.pid)  # they would outlive a killed master
            proc.kill()
            proc.wait()
            for pid in workers:
                _kill(pid)

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def requests(self, since: int = 0) -> list[Request]:
        """The parsed access log in order, from record ``since`` (a ``mark()``) on."""
        self._sync_log()
        return self._read_log()[since:]

    def bytes_sent(self, rel_prefix: str = "", since: int = 0) -> int:
        """Body bytes sent for requests (from ``since`` on) whose decoded path starts with "/"+rel_prefix."""
        prefix = "/" + rel_prefix
        return sum(r.body_bytes for r in self.requests(since) if r.path.startswith(prefix))

    def mark(self) -> int:
        """The number of access-log records so far; pass it as ``since`` to count only later ones."""
        return len(self.requests())

    def _read_log(self) -> list[Request]:
        """All records so far; parses only what was appended since the last call."""
        try:
            with open(self.access_log, "rb") as log:
                log.seek(self._log_offset)
                data = log.read()
        except FileNotFoundError:
            return self._records
        complete = data[: data.rfind(b"\n") + 1]  # a record is complete once its newline is written
        self._log_offset += len(complete)
        self._records += [_parse_record(line) for line in complete.decode("utf-8", "replace").split("\n")[:-1]]
        return self._records

    def _sync_log(self) -> None:
        """Wait until every response already received by a client is in the access log."""
        alive = self._proc is not None and self._proc.poll() is None
        if alive and not _answers(self.port, self._token, timeout=SYNC_TIMEOUT):
            raise RuntimeError(f"nginx on port {self.port} does not answer")

    def _start_once(self) -> str | None:
        """Launch nginx once; None when it accepts connections, else the text explaining why not."""
        self._write_config()
        for log in (self.access_log, self.error_log):
            log.unlink(missing_ok=True)
        self._records, self._log_offset = [], 0
        with open(self._stderr_path, "wb") as stderr:
            self._proc = subprocess.Popen(
                [NGINX_BIN, "-p", str(self.root_dir), "-c", str(self.conf_path), "-e", str(self.error_log)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return f"exited with status {self._proc.returncode}\n{self._diagnostics()}"
            if "Address already in use" in _read(self.error_log):
                return self._diagnostics()  # nginx would retry bind() for 2.5 s before exiting
            if _answers(self.port, self._token):
                return None
            time.sleep(POLL_INTERVAL)
        return f"not accepting connections after {START_TIMEOUT} s\n{self._diagnostics()}"

    def _diagnostics(self) -> str:
        parts = []
        for path in (self._stderr_path, self.error_log):
            tail = _read(path).splitlines()[-20:]
            if tail:
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def _write_config(self) -> None:
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.root_dir / "tmp" / name).mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(
            _CONFIG.format(
                root=self.root_dir,
                www=self.www_dir,
                port=self.port,
                slow_rate=self.slow_rate,
                token=self._token,
                autoindex="on" if self.autoindex else "off",
                log_format="\\t".join(LOG_FIELDS),
                auth=f"^(Bearer {AUTH_TOKEN}|Basic {_basic(AUTH_LOGIN, AUTH_TOKEN)})$",
            )
        )


# worker_processes 1: Nginx._sync_log relies on one single-threaded worker.
# `user root;`: we run as root and pytest's tmp dirs are mode 0700, so the default worker user
# (nobody) could read neither www_dir nor the log dir; nginx 1.22 accepts `user root` (no warning).
# A master not running as root ignores it, logging a [warn].
# escape=json: the request line and headers can hold tabs, quotes or control bytes; JSON escaping
# turns them into \t, \", \u00XX, so the tab separator is unambiguous, and absent headers log as ""
# rather than "-". Bytes >= 0x80 are written unescaped (decoded as UTF-8 when parsing).
_CONFIG = """\
user root;
worker_processes 1;
daemon off;
master_process on;
pid "{root}/nginx.pid";
error_log "{root}/error.log" notice;

events {{
    worker_connections 1024;
}}

http {{
    default_type application/octet-stream;
    log_format rangefs escape=json "{log_format}";
    access_log "{root}/access.log" rangefs;
    client_body_temp_path "{root}/tmp/client_body";
    proxy_temp_path "{root}/tmp/proxy";
    fastcgi_temp_path "{root}/tmp/fastcgi";
    uwsgi_temp_path "{root}/tmp/uwsgi";
    scgi_temp_path "{root}/tmp/scgi";
    sendfile on;
    keepalive_requests 10000;
    keepalive_timeout 60s;
    etag on;
    server_tokens off;

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        root "{www}";

        location / {{
            autoindex {autoindex};
            autoindex_exact_size on;
        }}
        location = /.nginx-helper-ready {{
            access_log off;
            return 200 "{token}";
        }}
        location /slow/ {{
            alias "{www}/";
            limit_rate {slow_rate};
        }}
        location /auth/ {{
            alias "{www}/";
            if ($http_authorization !~ "{auth}") {{
                return 401;
            }}
        }}
        location /nohead/ {{
            alias "{www}/";
            if ($request_method = HEAD) {{
                return 405;
            }}
        }}
    }}
}}
"""


def _basic(login: str, password: str) -> str:
    return base64.b64encode(f"{login}:{password}".encode()).decode()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int, token: str, timeout: float = 1.0) -> bool:
    """Whether our nginx answers the unlogged probe: a bare connect could reach another listener."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/.nginx-helper-ready")
        return conn.getresponse().read() == token.encode()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _parse_record(line: str) -> Request:
    fields = line.split("\t")
    if len(fields) != len(LOG_FIELDS):
        raise ValueError(f"unexpected access-log record {line!r}")
    method, uri, status, body_bytes, range_, if_range, end, seconds, connection = (
        _unescape(field) for field in fields
    )
    return Request(
        method=method,
        path=unquote(uri.split("?", 1)[0], errors="replace"),
        status=int(status),
        body_bytes=int(body_bytes),
        range=range_,
        if_range=if_range,
        end=float(end),
        seconds=float(seconds),
        connection=int(connection),
    )


def _unescape(field: str) -> str:
    r"""Undo escape=json (\" \\ \t \u001b ...): it writes JSON string syntax, bytes >= 0x80 as is."""
    return json.loads(f'"{field}"') if "\\" in field else field
