"""Parse a URL list into entries; no I/O beyond reading the file.

Imports only the standard library, rangefs.errors and rangefs.redact; raises UrlListError, whose message is one line
of the form ``{source} line {n}: {reason}`` (or names the file when it cannot be read at all).

The format, one entry per line::

    # a comment: the first non-blank character is '#'
    URL [PATH] [KEY=VALUE ...]

- Lines are split on newlines; blank lines and comment lines are ignored. A UTF-8 BOM is skipped.
- Fields are separated by runs of ASCII whitespace (space, tab, CR, FF, VT). Other control characters
  may not appear literally; percent-encode them.
- The first field is the URL: scheme http or https, with a host. It is kept as written.
- The second field, if present and free of ``=``, is the path of the file inside the mount, relative,
  ``/`` separating directories. Each component is percent-decoded after splitting on ``/``, so a path
  with spaces is written ``%20``, a literal ``%`` as ``%25``, ``=`` as ``%3D``; ``+`` stays ``+``.
- Without a path, the name is the percent-decoded last segment of the URL path (no query, no
  fragment); a URL path that is empty or ends with ``/`` has no name and needs an explicit path.
- Every further field is an option ``key=value`` (key: lowercase letter, then lowercase letters,
  digits, ``_`` or ``-``; value: non-empty, kept as written). A field with ``=`` in second place is
  an option too, so options may follow a URL without a path. Only keys in KNOWN_OPTIONS are accepted,
  each at most once, with one of its values: a list that parses today keeps its meaning when keys
  are added. ``grow=yes`` (or ``no``): the file may grow by appends (see rangefs.cache).
  ``header.NAME=VALUE``: send header NAME with VALUE (percent-decoded) on this URL's requests, to
  its own origin only (rangefs.auth); a value is a secret: no message quotes it.
- A path is refused when absolute, with an empty, ``.`` or ``..`` component, with a component that
  decodes to a name containing ``/`` or NUL or longer than NAME_MAX bytes in UTF-8, with bad
  percent-encoding, when another line already uses it, or when it would need a file to also be a
  directory (``a`` on one line, ``a/b`` on another).

URLs echoed in messages pass through redact_url, so credentials never reach a log or a terminal.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from dataclasses import field as _field
from urllib.parse import unquote, urlsplit

from rangefs.auth import Headers, entry_header
from rangefs.errors import UrlListError
from rangefs.redact import redact_url

SCHEMES = frozenset({"http", "https"})
# Option keys this version understands, with their values. Unknown keys are errors so that adding
# a key later cannot change the meaning of a list that is accepted today.
KNOWN_OPTIONS: dict[str, frozenset[str] | None] = {"grow": frozenset({"yes", "no"})}  # None: any value
NAME_MAX = 255  # bytes in one path component: Linux NAME_MAX, what the kernel accepts in a lookup
_WHITESPACE = " \t\r\f\v"
_FIELD_SEP = re.compile(r"[ \t\r\f\v]+")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # \t..\r are separators, not errors
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_OPTION = re.compile(r"([a-z][a-z0-9_-]*|header\.[^=\s]+)=(\S+)\Z")


@dataclass(frozen=True)
class Entry:
    """One line of a URL list: where a file comes from and where it appears in the mount."""

    url: str
    path: tuple[str, ...]
    line: int
    options: tuple[tuple[str, str], ...] = _field(default=(), repr=False)  # header values are secrets

    def option(self, key: str) -> str | None:
        return dict(self.options).get(key)

    @property
    def headers(self) -> Headers:
        """The ``header.NAME=VALUE`` options, decoded (checked when the list was parsed)."""
        return tuple(entry_header(key, value) for key, value in self.options if key.startswith("header."))


class _LineError(Exception):
    """Why one line cannot be used; parse_url_list adds the source and the line number."""


def parse_url_list(text: str, source: str = "<urls>") -> list[Entry]:
    """Parse the text of a URL list into entries, in the order of the lines.

    Raises:
        UrlListError: a line breaks the format; the message names source and line.
    """
    entries: list[Entry] = []
    layout = _Layout()
    for number, raw in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = raw.strip(_WHITESPACE)
        if not line or line.startswith("#"):
            continue
        try:
            entry = _parse_line(line, number)
            layout.claim(entry.path, number)
        except _LineError as e:
            raise UrlListError(f"{source} line {number}: {e}") from None
        entries.append(entry)
    return entries


def load_url_list(path: str | os.PathLike[str]) -> list[Entry]:
    """Read a UTF-8 URL list file and parse it; a list without entries is an error.

    Raises:
        UrlListError: the file cannot be read, is not UTF-8, breaks the format or has no entries.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UrlListError(f"cannot read URL list {name!r}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UrlListError(f"cannot read URL list {name!r}: not valid UTF-8 on line {line}") from None
    entries = parse_url_list(text, name)
    if not entries:
        raise UrlListError(f"URL list {name!r} has no entries")
    return entries


def _parse_line(line: str, number: int) -> Entry:
    """Parse one non-blank, non-comment line (already stripped) into an entry."""
    _check_characters(line)
    url, *fields = _FIELD_SEP.split(line)
    _check_url(url)
    if fields and "=" not in fields[0]:
        path = _split_path(fields.pop(0))
    else:
        path = (_name_from_url(url),)
    return Entry(url=url, path=path, line=number, options=_parse_options(fields))


def _check_characters(line: str) -> None:
    """Refuse control characters that are not field separators."""
    found = _CONTROL.search(line)
    if found is None:
        return
    what = "NUL byte" if found.group() == "\0" else f"control character {found.group()!r}"
    raise _LineError(f"{what} in the line (percent-encode it in a path)")


def _check_url(url: str) -> None:
    """Refuse a URL that is malformed, not http(s), or has no host."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # only reading the port checks it: raises ValueError on a bad one
    except ValueError:
        # the parser's own message may quote a password: say nothing of it
        raise _LineError(f"invalid URL {_redact_loosely(url)!r}") from None
    if not parts.scheme:
        raise _LineError(f"URL {redact_url(url)!r} has no scheme (only http and https)")
    if parts.scheme not in SCHEMES:
        raise _LineError(f"unsupported scheme {parts.scheme!r} (only http and https)")
    if not parts.hostname:
        raise _LineError(f"URL {redact_url(url)!r} has no host")


def _redact_loosely(url: str) -> str:
    """For a URL that does not parse: hide all between '://' and the last '@' (a password may hold '#', '/')."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        return redact_url(f"{scheme}://***@{rest.rpartition('@')[2]}")
    return redact_url(url)


def _name_from_url(url: str) -> str:
    """Derive a file name from the last segment of the URL path."""
    segment = urlsplit(url).path.rpartition("/")[2]
    if not segment:
        raise _LineError(
            f"cannot derive a file name from URL {redact_url(url)!r} "
            "(its path is empty or ends with '/'); write a path after the URL"
        )
    try:
        return _component(segment, segment)
    except _LineError as e:
        raise _LineError(f"cannot derive a file name from URL {redact_url(url)!r}: {e}") from None


def _split_path(field: str) -> tuple[str, ...]:
    """Split a relative path field on '/' and decode each component."""
    if field.startswith("/"):
        raise _LineError(f"absolute path {field!r} (paths are relative to the mount)")
    return tuple(_component(part, field) for part in field.split("/"))


def _component(text: str, whole: str) -> str:
    """Percent-decode one path component and check that it is a usable file name."""
    if not text:
        raise _LineError(f"empty component in path {whole!r}")
    name = _percent_decode(text)
    if name in (".", ".."):
        raise _LineError(f"{name!r} component in path {whole!r}")
    if "/" in name:
        raise _LineError(f"component {text!r} of {whole!r} decodes to a name containing '/'")
    if "\0" in name:
        raise _LineError(f"NUL byte in path {whole!r}")
    size = len(name.encode())
    if size > NAME_MAX:
        raise _LineError(f"component {text[:20]!r}... is {size} bytes in UTF-8 (at most {NAME_MAX})")
    return name


def _percent_decode(text: str) -> str:
    """Decode %XX escapes strictly: every '%' starts an escape and the result must be UTF-8."""
    if _BAD_PERCENT.search(text):
        raise _LineError(f"invalid percent-encoding in {text!r} (write a literal '%' as %25)")
    try:
        name = unquote(text, errors="strict")
        name.encode()  # lone surrogates in the input text would pass unquote
    except UnicodeError:
        raise _LineError(f"percent-encoding in {text!r} is not valid UTF-8") from None
    return name


def _parse_options(fields: list[str]) -> tuple[tuple[str, str], ...]:
    """Parse the ``key=value`` fields after the path; only known keys, each once."""
    options: dict[str, str] = {}
    for field in fields:
        match = _OPTION.match(field)
        if match is None:
            raise _LineError(_field_problem(field))
        key, value = match.groups()
        if key.startswith("header."):
            try:
                entry_header(key, value)
            except ValueError as exc:
                raise _LineError(str(exc)) from None
            key = "header." + key.removeprefix("header.").lower()  # one name, any case: given twice
            if key in options:
                raise _LineError(f"option {key!r} given twice")
            options[key] = value
            continue
        if key not in KNOWN_OPTIONS:
            raise _LineError(f"unknown option {key!r} (a path containing '=' must write it as %3D)")
        if key in options:
            raise _LineError(f"option {key!r} given twice")
        allowed = KNOWN_OPTIONS[key]
        if allowed is not None and value not in allowed:
            raise _LineError(f"option {key!r} must be {' or '.join(sorted(allowed))}")
        options[key] = value
    return tuple(options.items())


def _field_problem(field: str) -> str:
    """Say why a field after the path is not a ``key=value`` option (values may be secret)."""
    if "=" not in field:  # maybe the rest of an option's value that held a space: never shown
        return "too many fields after the path (write spaces in a path or a value as %20; options are key=value)"
    key = field.partition("=")[0]
    return f"bad option syntax {key + '=...'!r} (expected key=value, a lowercase key, a non-empty value)"


class _Layout:
    """The mount's tree so far: which line made each file and each directory."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, ...], int] = {}
        self.dirs: dict[tuple[str, ...], int] = {}

    def claim(self, path: tuple[str, ...], line: int) -> None:
        """Record path as a file made by line, refusing duplicates and file/directory clashes."""
        shown = "/".join(path)
        if path in self.files:
            raise _LineError(f"path {shown!r} already used on line {self.files[path]}")
        if path in self.dirs:
            raise _LineError(f"path {shown!r} is a directory because of line {self.dirs[path]}")
        for end in range(1, len(path)):
            if path[:end] in self.files:
                parent = "/".join(path[:end])
                raise _LineError(
                    f"path {shown!r} needs {parent!r} to be a directory, "
                    f"but line {self.files[path[:end]]} made it a file"
                )
        for end in range(1, len(path)):
            self.dirs.setdefault(path[:end], line)
        self.files[path] = line
