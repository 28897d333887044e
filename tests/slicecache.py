"""A shared caching proxy for the fleet tests: an nginx ``proxy_cache`` with the ``slice`` module
in front of an origin on 127.0.0.1; standard library only.

``SliceCache(root_dir, origin_port)`` is a ``tests.nginx.Nginx`` whose config proxies every
request to the origin through a slice cache (the config docs/fleet.md recommends, with the cache,
its temp files, the logs and the pid under ``root_dir``). Its access log has the same fields as
the origin's, so ``requests()``, ``bytes_sent()`` and ``mark()`` work the same way.
``slice_path(uri, start)`` names the cache file of one slice, so a test can evict it as an LRU
would.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from nginx import LOG_FIELDS, NGINX_BIN, Nginx

SLICE_SIZE = 1024 * 1024  # the test's slice: 1 MiB, a multiple of rangefs's 64 KiB block


def has_slice_module() -> bool:
    """Whether this machine's nginx was built with the slice module (``nginx -V`` says so)."""
    done = subprocess.run([NGINX_BIN, "-V"], capture_output=True, text=True, timeout=30)
    return "--with-http_slice_module" in done.stderr + done.stdout


class SliceCache(Nginx):
    """An nginx (1 worker) on 127.0.0.1 caching ``origin_port``'s answers in slices of ``slice_size``."""

    def __init__(self, root_dir: Path, origin_port: int, slice_size: int = SLICE_SIZE, valid: str = "1h") -> None:
        """``valid``: how long a cached slice is used without asking the origin (nginx time syntax)."""
        super().__init__(root_dir, root_dir)
        self.origin_port = origin_port
        self.slice_size = slice_size
        self.valid = valid
        self.cache_dir = self.root_dir / "cache"

    def slice_path(self, uri: str, start: int) -> Path:
        """The cache file of the slice holding byte ``start`` of ``uri`` (levels=1:2, key below)."""
        first = start - start % self.slice_size
        key = f"{uri}bytes={first}-{first + self.slice_size - 1}"
        digest = hashlib.md5(key.encode()).hexdigest()
        return self.cache_dir / digest[-1] / digest[-3:-1] / digest

    def _write_config(self) -> None:
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.root_dir / "tmp" / name).mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(
            _CONFIG.format(
                root=self.root_dir,
                cache=self.cache_dir,
                port=self.port,
                origin_port=self.origin_port,
                slice=self.slice_size,
                valid=self.valid,
                token=self._token,
                log_format="\\t".join(LOG_FIELDS),
            )
        )


# The http block is the one docs/fleet.md explains, line for line; only the paths, the ports and
# the readiness location (see tests/nginx.py) are the test's. `user root`, one worker, the log
# format: as tests/nginx.py says.
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
    log_format rangefs escape=json "{log_format}";
    access_log "{root}/access.log" rangefs;
    client_body_temp_path "{root}/tmp/client_body";
    proxy_temp_path "{root}/tmp/proxy";
    fastcgi_temp_path "{root}/tmp/fastcgi";
    uwsgi_temp_path "{root}/tmp/uwsgi";
    scgi_temp_path "{root}/tmp/scgi";
    server_tokens off;
    keepalive_requests 10000;

    proxy_cache_path "{cache}" levels=1:2 keys_zone=fleet:10m max_size=2g inactive=7d use_temp_path=off;

    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 16;
    }}

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;

        location = /.nginx-helper-ready {{
            access_log off;
            return 200 "{token}";
        }}

        location / {{
            slice {slice};
            proxy_cache fleet;
            proxy_cache_key $uri$is_args$args$slice_range;
            proxy_set_header Range $slice_range;
            proxy_cache_valid 200 206 {valid};
            proxy_cache_lock on;
            proxy_cache_lock_timeout 60s;
            proxy_cache_lock_age 60s;
            proxy_cache_revalidate on;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Accept-Encoding "";
            proxy_pass http://origin;
        }}
    }}
}}
"""
