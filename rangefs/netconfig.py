"""TLS trust and client certificates, and which proxy a URL goes through: shared by both HTTP clients.

Imports only the standard library and httpx (for its default trust store); rangefs.origin builds one
SSL context from ``tls_context`` for httpx and rangefs.http11 alike, and the proxy map from
``proxy_map`` becomes httpx's mounts. The lean client (rangefs.http11) never speaks to a proxy:
rangefs.origin sends the range GETs of a proxied URL through httpx, which implements the
absolute-form request and the CONNECT tunnel (why: docs/internals.md, 'Headers, TLS and proxies').
"""

from __future__ import annotations

import ssl
import urllib.request
from urllib.parse import urlsplit

import httpx

from rangefs.errors import UsageError


def tls_context(ca_bundle: str | None, client_cert: str | None, client_key: str | None) -> ssl.SSLContext:
    """The context both clients use: verification always on; trust from ``ca_bundle`` when given,
    else httpx's (SSL_CERT_FILE or SSL_CERT_DIR when set, else certifi); the client certificate
    (and its key, when in another file) when given.

    Raises:
        UsageError: a file cannot be read or holds no usable certificate or key (one line naming it).
    """
    if ca_bundle is None:
        context = httpx.create_ssl_context()
    else:
        try:
            context = ssl.create_default_context(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"--ca-bundle '{ca_bundle}': {_reason(exc)}") from None
    if client_cert is not None:
        try:
            # An empty password: an encrypted key fails here instead of prompting on the terminal.
            context.load_cert_chain(client_cert, client_key, password=b"")
        except (OSError, ssl.SSLError) as exc:
            files = f"'{client_cert}'" + (f" with key '{client_key}'" if client_key else "")
            raise UsageError(f"--client-cert {files}: {_reason(exc)} (an unencrypted PEM key is needed)") from None
    return context


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"not a usable certificate or key ({exc.reason or 'unknown'})"
    return exc.strerror or str(exc)


def proxy_map(proxy: str | None) -> dict[str, str | None]:
    """httpx mount patterns -> proxy URL, or None for "direct": from HTTP_PROXY, HTTPS_PROXY,
    ALL_PROXY and NO_PROXY (either case) as curl reads them, ``proxy`` (``--proxy``) replacing the
    variables' proxies while NO_PROXY still holds."""
    # httpx's own reading of the variables, the same one curl documents; private, so pinned by tests.
    from httpx._utils import get_environment_proxies

    mapping = get_environment_proxies()
    if proxy is not None:
        mapping = {key: value for key, value in mapping.items() if value is None}
        if mapping or urllib.request.getproxies().get("no", "").strip() != "*":
            mapping["all://"] = proxy
    return mapping


def check_proxy(proxy: str) -> str:
    """A ``--proxy`` URL: http or https with a host. Raises UsageError without quoting the user info."""
    try:
        parts = urlsplit(proxy)
        _ = parts.port
    except ValueError:
        raise UsageError("--proxy: not a URL (expected http://[user:password@]host:port)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError("--proxy: expected http://[user:password@]host:port (or https://)")
    return proxy
