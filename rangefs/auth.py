"""Headers and credentials the user gives: ``--header``, ``--header @FILE``, per-entry ``header.NAME=``, netrc.

Imports only the standard library and rangefs.errors. Everything here is a secret until sent:
messages name the file, the line and the header's name, never a value; the values live in
OriginConfig (``repr=False``) and in each RemoteFile's ``headers`` (``repr=False``), both of which
travel to the fetch helper over its socket, never in its argv or environment.

Which request gets them is rangefs.origin's rule: only requests to the listed URL's origin
(scheme, host, port). A redirect to another origin, and range GETs that follow it there, carry
none of them: an Authorization or Cookie meant for one server is not handed to another.
"""

from __future__ import annotations

import base64
import netrc
import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from rangefs.errors import UsageError

Headers = tuple[tuple[str, str], ...]

# RFC 9110 5.1 token; 5.5 field value, ASCII only (both clients send headers as ASCII): visible
# characters, with spaces and tabs inside; no CR, LF, NUL or other control byte.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e\t]*[\x21-\x7e])?|")
# Headers rangefs sets itself: a user's value would break ranges or the connection.
RESERVED = frozenset({"host", "range", "if-range", "accept-encoding", "content-length", "transfer-encoding",
                      "connection", "te", "upgrade", "proxy-authorization"})
_MAX_HEADERS_FILE = 1 << 20  # a headers file larger than this is not a headers file


def check_header(name: str, value: str, where: str) -> tuple[str, str]:
    """``(name, value)`` when both may be sent, else UsageError naming ``where`` and the name only."""
    if not _TOKEN.fullmatch(name):  # not shown: a line without its colon puts the value here
        raise UsageError(f"{where}: invalid header name (letters, digits and !#$%&'*+.^_`|~- only; "
                         "write 'Name: value')")
    if name.lower() in RESERVED:
        raise UsageError(f"{where}: header {name} is set by rangefs itself and cannot be given")
    value = value.strip(" \t")
    if not _VALUE.fullmatch(value):
        raise UsageError(f"{where}: the value of header {name} holds a line break, a control character or non-ASCII")
    return name, value


def parse_header_line(text: str, where: str) -> tuple[str, str]:
    """``Name: value`` (as curl's -H) into a checked pair."""
    name, colon, value = text.partition(":")
    if not colon:
        raise UsageError(f"{where}: expected 'Name: value'")
    return check_header(name, value, where)


def header_argument(text: str) -> Headers:
    """One ``--header`` argument: ``Name: value``, or ``@FILE`` with one ``Name: value`` per line
    (blank lines and lines starting with '#' skipped)."""
    if not text.startswith("@"):
        return (parse_header_line(text, "--header"),)
    path = text[1:]
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_HEADERS_FILE + 1)
    except OSError as exc:
        raise UsageError(f"cannot read headers file '{path}': {exc.strerror or exc}") from None
    if len(data) > _MAX_HEADERS_FILE:
        raise UsageError(f"headers file '{path}' is larger than {_MAX_HEADERS_FILE} bytes")
    try:
        lines = data.decode("utf-8").removeprefix("\ufeff").split("\n")
    except UnicodeDecodeError as exc:
        where = data.count(b"\n", 0, exc.start) + 1
        raise UsageError(f"headers file '{path}' line {where}: not UTF-8") from None
    found = []
    for number, raw in enumerate(lines, start=1):
        text = raw.removesuffix("\r")
        if text.strip() and not text.lstrip().startswith("#"):
            found.append(parse_header_line(text, f"headers file '{path}' line {number}"))
    return tuple(found)


def entry_header(key: str, value: str) -> tuple[str, str]:
    """A URL list's ``header.NAME=VALUE`` (VALUE percent-encoded); raises ValueError with the reason."""
    try:
        decoded = unquote(value, errors="strict")
    except UnicodeError:
        raise ValueError(f"the value of option {key!r} is not valid UTF-8 once decoded") from None
    try:
        return check_header(key.removeprefix("header."), decoded, f"option {key!r}")
    except UsageError as exc:
        raise ValueError(str(exc).removeprefix(f"option {key!r}: ")) from None


@dataclass(frozen=True)
class NetrcLogin:
    """One netrc ``machine`` (``host`` None: the ``default`` entry)."""

    host: str | None
    login: str
    password: str = ""


def load_netrc(path: str | None) -> tuple[NetrcLogin, ...]:
    """The logins of a netrc file (``~/.netrc`` when ``path`` is None), as curl reads them.

    A missing ``~/.netrc`` is no logins (curl's --netrc too); a missing named file, or one that does
    not parse, is a UsageError naming the file and line, never a token of it.
    """
    name = path if path is not None else os.path.join(os.path.expanduser("~"), ".netrc")
    if path is None and not os.path.exists(name):
        return ()
    try:
        parsed = netrc.netrc(name)
    except netrc.NetrcParseError as exc:  # its message may quote a token: keep only where
        raise UsageError(f"netrc file '{name}' line {exc.lineno}: cannot parse it") from None
    except OSError as exc:
        raise UsageError(f"cannot read netrc file '{name}': {exc.strerror or exc}") from None
    logins = []
    for host, (login, _account, password) in parsed.hosts.items():
        key = None if host == "default" else host.lower()
        logins.append(NetrcLogin(key, login or "", password or ""))
    return tuple(logins)


def netrc_authorization(url: str, logins: tuple[NetrcLogin, ...]) -> Headers:
    """Basic Authorization for ``url`` from netrc, as curl: the machine matching the host, else the
    default; none when the URL carries its own user info."""
    parts = urlsplit(url)
    if parts.username is not None or not logins:
        return ()
    host = (parts.hostname or "").lower()
    chosen = next((x for x in logins if x.host == host), None) or next((x for x in logins if x.host is None), None)
    if chosen is None:
        return ()
    token = base64.b64encode(f"{chosen.login}:{chosen.password}".encode()).decode("ascii")
    return (("Authorization", f"Basic {token}"),)
