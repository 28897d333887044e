"""Unit tests of rangefs.urllist: the URL list format, its errors, redaction and file loading."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rangefs import urllist
from rangefs.errors import UrlListError, UsageError
from rangefs.redact import redact_url
from rangefs.urllist import Entry, load_url_list, parse_url_list


def parse_one(line: str) -> Entry:
    """Parse a one-entry list and return its entry."""
    entries = parse_url_list(line)
    assert len(entries) == 1
    return entries[0]


def error_of(text: str, source: str = "<urls>") -> str:
    """Parse text that must fail and return the one-line message."""
    with pytest.raises(UrlListError) as info:
        parse_url_list(text, source)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- entries, names and paths ---------------------------------------------------------------------


def test_name_is_last_url_segment() -> None:
    entry = parse_one("https://example.com/data/file.bin")
    assert entry == Entry(url="https://example.com/data/file.bin", path=("file.bin",), line=1, options=())


def test_name_is_percent_decoded_unicode_and_excludes_query_and_fragment() -> None:
    entry = parse_one("https://h/a/caf%C3%A9.txt?x=1&y=%2F#frag")
    assert entry.path == ("café.txt",)
    assert entry.url == "https://h/a/caf%C3%A9.txt?x=1&y=%2F#frag"


def test_plus_in_name_stays_plus() -> None:
    assert parse_one("http://h/a+b%20c.txt").path == ("a+b c.txt",)


def test_explicit_path_with_subdirectories() -> None:
    entry = parse_one("https://h/x?sig=1   videos/2024/a.mp4")
    assert entry.path == ("videos", "2024", "a.mp4")
    assert entry.url == "https://h/x?sig=1"


def test_explicit_path_is_percent_decoded_per_component() -> None:
    entry = parse_one("https://h/x my%20dir/r%C3%A9sum%C3%A9%3D1%25.pdf")
    assert entry.path == ("my dir", "résumé=1%.pdf")


def test_literal_unicode_path() -> None:
    assert parse_one("https://h/x données/été.csv").path == ("données", "été.csv")


def test_comments_blank_lines_and_line_numbers() -> None:
    text = "# header\n\n   \n\t# indented comment\nhttps://h/a.bin\r\n  https://h/b.bin  \n\nhttps://h/c d/c.bin\n"
    entries = parse_url_list(text)
    assert [(e.path, e.line) for e in entries] == [(("a.bin",), 5), (("b.bin",), 6), (("d", "c.bin"), 8)]
    assert entries[1].url == "https://h/b.bin"


def test_empty_text_gives_no_entries() -> None:
    assert parse_url_list("# only a comment\n\n") == []


def test_bom_is_skipped() -> None:
    assert parse_url_list("\ufeffhttps://h/a.bin")[0].path == ("a.bin",)


def test_tabs_separate_fields() -> None:
    assert parse_one("https://h/x\tdir/y").path == ("dir", "y")


def test_uppercase_scheme_and_credentials_accepted_and_kept() -> None:
    entry = parse_one("HTTPS://user:pw@h:8443/f.bin")
    assert entry.url == "HTTPS://user:pw@h:8443/f.bin"
    assert entry.path == ("f.bin",)


def test_same_url_under_two_paths_is_allowed() -> None:
    entries = parse_url_list("https://h/a.bin one.bin\nhttps://h/a.bin two.bin\n")
    assert [e.path for e in entries] == [("one.bin",), ("two.bin",)]


def test_sibling_files_share_a_directory() -> None:
    entries = parse_url_list("https://h/1 d/a\nhttps://h/2 d/b\nhttps://h/3 d/e/f\n")
    assert [e.path for e in entries] == [("d", "a"), ("d", "b"), ("d", "e", "f")]


def test_entry_is_frozen_and_hashable() -> None:
    entry = parse_one("https://h/a.bin")
    assert hash(entry) == hash(parse_one("https://h/a.bin"))
    with pytest.raises(AttributeError):
        entry.url = "x"  # type: ignore[misc]


def test_error_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        parse_url_list("ftp://h/a")


# --- URL errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme"), [("ftp://h/a.bin", "ftp"), ("file:///etc/passwd", "file"), ("s3://b/k", "s3")]
)
def test_unsupported_scheme(url: str, scheme: str) -> None:
    message = error_of(f"# c\n{url}\n", "list.txt")
    assert message.startswith("list.txt line 2: ")
    assert f"unsupported scheme '{scheme}' (only http and https)" in message


def test_missing_scheme() -> None:
    message = error_of("\n/srv/data/a.bin\n")
    assert message.startswith("<urls> line 2: ")
    assert "no scheme" in message and "only http and https" in message


def test_no_host() -> None:
    message = error_of("https:///a.bin")
    assert message.startswith("<urls> line 1: ") and "has no host" in message


def test_no_host_with_credentials_is_redacted() -> None:
    message = error_of("https://user:hunter2@/a.bin")
    assert "has no host" in message
    assert "hunter2" not in message and "***@" in message


def test_bad_port() -> None:
    message = error_of("http://h:99999/a.bin")
    assert message.startswith("<urls> line 1: invalid URL")


def test_bad_ipv6_host() -> None:
    assert "line 1: invalid URL" in error_of("http://[::1/a.bin")


# --- names that cannot be derived ----------------------------------------------------------------


@pytest.mark.parametrize("url", ["https://h", "https://h/", "https://h/dir/", "https://h?x=a.bin"])
def test_name_cannot_be_derived(url: str) -> None:
    message = error_of(f"https://h/ok.bin\n{url}")
    assert message.startswith("<urls> line 2: cannot derive a file name")
    assert "write a path after the URL" in message


def test_derived_name_dot_dot_refused() -> None:
    message = error_of("https://h/a/%2E%2E")
    assert message.startswith("<urls> line 1: cannot derive a file name") and "'..'" in message


def test_derived_name_with_encoded_slash_refused() -> None:
    assert "containing '/'" in error_of("https://h/a%2Fb")


def test_derived_name_error_redacts_credentials() -> None:
    message = error_of("https://u:topsecret@h/dir/?token=abc")
    assert "topsecret" not in message and "abc" not in message
    assert "https://***@h/dir/?token=***" in message


# --- path errors ---------------------------------------------------------------------------------


def test_absolute_path() -> None:
    message = error_of("https://h/a /etc/a")
    assert message.startswith("<urls> line 1: absolute path '/etc/a'")


@pytest.mark.parametrize("path", ["../a", "a/../b", "a/..", "%2E%2E/a"])
def test_dot_dot_component(path: str) -> None:
    message = error_of(f"https://h/a {path}")
    assert message.startswith("<urls> line 1: '..' component")


@pytest.mark.parametrize("path", ["./a", "a/./b", "."])
def test_dot_component(path: str) -> None:
    assert error_of(f"https://h/a {path}").startswith("<urls> line 1: '.' component")


@pytest.mark.parametrize("path", ["a//b", "a/", "a/b//"])
def test_empty_component(path: str) -> None:
    assert error_of(f"https://h/a {path}").startswith("<urls> line 1: empty component")


def test_encoded_slash_in_path_component() -> None:
    assert "containing '/'" in error_of("https://h/a dir/a%2Fb")


def test_nul_byte_encoded() -> None:
    assert error_of("https://h/a a%00b").startswith("<urls> line 1: NUL byte")


def test_nul_byte_literal() -> None:
    assert error_of("https://h/a a\0b").startswith("<urls> line 1: NUL byte")


def test_other_control_character_literal() -> None:
    assert error_of("https://h/a a\x1bb").startswith("<urls> line 1: control character")


def test_component_length_counts_utf8_bytes() -> None:
    ok = "é" * 127 + "x"  # 255 bytes
    assert parse_one(f"https://h/a d/{ok}").path == ("d", ok)
    too_long = "é" * 128  # 256 bytes, 128 characters
    message = error_of(f"https://h/a d/{too_long}")
    assert message.startswith("<urls> line 1: component") and "256 bytes in UTF-8" in message


def test_derived_name_too_long() -> None:
    assert "256 bytes" in error_of("https://h/" + "a" * 256)


@pytest.mark.parametrize("path", ["a%", "a%2", "a%zz", "100%"])
def test_malformed_percent_escape(path: str) -> None:
    message = error_of(f"https://h/a {path}")
    assert message.startswith("<urls> line 1: invalid percent-encoding")


@pytest.mark.parametrize("path", ["a%FF", "%C3", "%C3%28"])
def test_percent_encoding_not_utf8(path: str) -> None:
    message = error_of(f"https://h/a {path}")
    assert message.startswith("<urls> line 1: percent-encoding") and "not valid UTF-8" in message


def test_lone_surrogate_in_text() -> None:
    assert "not valid UTF-8" in error_of("https://h/a x\udc80")


# --- duplicates and file/directory clashes -------------------------------------------------------


def test_duplicate_path() -> None:
    text = "https://h/1 x.bin\n\nhttps://h/2 a/b.bin\nhttps://h/3 a/b.bin\n"
    assert error_of(text) == "<urls> line 4: path 'a/b.bin' already used on line 3"


def test_duplicate_derived_name() -> None:
    message = error_of("https://h/a/f.bin\nhttps://g/b/f.bin?v=2")
    assert message == "<urls> line 2: path 'f.bin' already used on line 1"


def test_duplicate_after_decoding() -> None:
    message = error_of("https://h/1 my%20file\nhttps://h/2 my%20fil%65")
    assert message == "<urls> line 2: path 'my file' already used on line 1"


def test_file_then_directory() -> None:
    message = error_of("https://h/1 a\n# c\nhttps://h/2 a/b\n")
    assert message.startswith("<urls> line 3: ")
    assert "'a' to be a directory" in message and "line 1" in message


def test_directory_then_file() -> None:
    message = error_of("https://h/1 a/b/c\nhttps://h/2 a/b\n")
    assert message.startswith("<urls> line 2: path 'a/b' is a directory") and "line 1" in message


def test_paths_are_case_sensitive() -> None:
    assert len(parse_url_list("https://h/1 A\nhttps://h/2 a\n")) == 2


# --- fields and options --------------------------------------------------------------------------


def test_too_many_fields() -> None:
    message = error_of("https://h/a my file.txt")
    # The field is not shown: it may be the rest of an option's value that held a space.
    assert message.startswith("<urls> line 1: too many fields") and "file.txt" not in message
    assert "%20" in message


def test_unknown_option_after_path() -> None:
    message = error_of("https://h/a dir/a sha256=abc")
    assert message == ("<urls> line 1: unknown option 'sha256' (a path containing '=' must write it as %3D)")


def test_unknown_option_without_path() -> None:
    assert error_of("https://h/a mirror=https://m/a").startswith("<urls> line 1: unknown option 'mirror'")


def test_second_field_with_equals_is_an_option_not_a_path() -> None:
    assert "unknown option 'a'" in error_of("https://h/x a=b.txt")


@pytest.mark.parametrize("field", ["Key=v", "=v", "k=", "1k=v", "k.x=v"])
def test_bad_option_syntax(field: str) -> None:
    message = error_of(f"https://h/a p {field}")
    assert message.startswith("<urls> line 1: bad option syntax")


def test_bad_option_does_not_echo_value() -> None:
    message = error_of("https://h/a p Token=s3cr3t")
    assert "s3cr3t" not in message and "'Token=...'" in message


def test_known_options_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllist, "KNOWN_OPTIONS", {"sha256": None, "mirror": None})
    entry = parse_one("https://h/a.bin sha256=ab=cd mirror=https://m/a%20b")
    assert entry.path == ("a.bin",)
    assert entry.options == (("sha256", "ab=cd"), ("mirror", "https://m/a%20b"))
    assert parse_one("https://h/a.bin d/x mirror=m").options == (("mirror", "m"),)


def test_duplicate_known_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllist, "KNOWN_OPTIONS", {"mirror": None})
    message = error_of("https://h/a.bin mirror=a mirror=b")
    assert message == "<urls> line 1: option 'mirror' given twice"


def test_path_after_option_is_too_many_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllist, "KNOWN_OPTIONS", {"mirror": None})
    assert "too many fields" in error_of("https://h/a.bin mirror=a dir/x")


# --- redact_url ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:pw@h/x", "https://***@h/x"),
        ("https://token@h:8080/x?a=1", "https://***@h:8080/x?a=***"),
        ("https://a@b:c@h/x", "https://***@h/x"),
        (
            "https://h/x?X-Amz-Signature=abc&X-Amz-Date=2024",
            "https://h/x?X-Amz-Signature=***&X-Amz-Date=***",
        ),
        ("https://h/x?sig=1&se=2&sp=r", "https://h/x?sig=***&se=***&sp=***"),
        (
            "https://h/x?access_token=t&api_key=k&Password=p",
            "https://h/x?access_token=***&api_key=***&Password=***",
        ),
        ("https://h/x?AUTH=a;passwd=b;secret=c", "https://h/x?AUTH=***;passwd=***;secret=***"),
        ("https://h/x?X-Goog-Credential=c&sessionid=s", "https://h/x?X-Goog-Credential=***&sessionid=***"),
        ("https://h/x?%74oken=t", "https://h/x?%74oken=***"),
        ("https://h/x?token&page=2", "https://h/x?***&page=***"),
        ("https://h/x?token=&a", "https://h/x?token=***&***"),
        ("https://h/p@th/x?q=1#sig=frag", "https://h/p@th/x?q=***#***"),
        ("https://h/x?AbCdSecretToken", "https://h/x?***"),
        # names no list of secret words knows (CloudFront, OAuth, short signed-URL keys)
        ("https://h/x?code=S1&Policy=S2&p=S3", "https://h/x?code=***&Policy=***&p=***"),
        ("https://h/x?a=1=2&b", "https://h/x?a=***&***"),
        ("https://h/file.bin", "https://h/file.bin"),
        ("user:pw@host/x", "***@host/x"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "odd", ["", "?", "#", "@", "://", "http://[::1", "%zz?=&&==;", "\0\udc80", "a" * 10000]
)
def test_redact_url_never_raises(odd: str) -> None:
    assert isinstance(redact_url(odd), str)


# --- load_url_list -------------------------------------------------------------------------------


def test_load_reads_file_and_names_it_in_line_errors(tmp_path: Path) -> None:
    good = tmp_path / "urls.txt"
    good.write_text("# list\nhttps://h/caf%C3%A9.txt\nhttps://h/b données/b\n", encoding="utf-8")
    assert [e.path for e in load_url_list(good)] == [("café.txt",), ("données", "b")]
    assert [e.path for e in load_url_list(str(good))] == [("café.txt",), ("données", "b")]
    bad = tmp_path / "bad.txt"
    bad.write_text("https://h/a\nftp://h/b\n", encoding="utf-8")
    with pytest.raises(UrlListError, match=r"^.*bad\.txt line 2: unsupported scheme 'ftp'"):
        load_url_list(bad)


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(UrlListError) as info:
        load_url_list(missing)
    assert str(info.value) == f"cannot read URL list '{missing}': No such file or directory"


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(UrlListError) as info:
        load_url_list(tmp_path)
    assert str(info.value) == f"cannot read URL list '{tmp_path}': Is a directory"


def test_load_path_through_a_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(UrlListError) as info:
        load_url_list(plain / "urls.txt")
    assert str(info.value) == f"cannot read URL list '{plain / 'urls.txt'}': Not a directory"


def test_load_unreadable_file(tmp_path: Path) -> None:
    locked = tmp_path / "locked.txt"
    locked.write_text("https://h/a\n")
    locked.chmod(0)
    # root reads any file, so the child drops to an unprivileged user before reading
    code = (
        "import sys\n"
        "from rangefs.errors import UrlListError\n"
        "from rangefs.urllist import load_url_list\n"
        "import os\n"
        "if os.geteuid() == 0:\n    os.setresuid(65534, 65534, 65534)\n"
        "try:\n    load_url_list(sys.argv[1])\n"
        "except UrlListError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", code, str(locked)], capture_output=True, text=True, env=env, timeout=30
    )
    assert done.stdout.strip() == f"cannot read URL list '{locked}': Permission denied", done.stderr


def test_load_not_utf8(tmp_path: Path) -> None:
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"https://h/a\nhttps://h/b caf\xe9\n")
    with pytest.raises(UrlListError) as info:
        load_url_list(latin)
    assert str(info.value) == f"cannot read URL list '{latin}': not valid UTF-8 on line 2"


@pytest.mark.parametrize("content", ["", "\n\n", "# nothing here\n   \n"])
def test_load_empty_list(tmp_path: Path, content: str) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    with pytest.raises(UrlListError) as info:
        load_url_list(empty)
    assert str(info.value) == f"URL list '{empty}' has no entries"


def test_grow_option() -> None:
    assert parse_one("https://h/log.txt grow=yes").option("grow") == "yes"
    assert parse_one("https://h/log.txt logs/a.txt grow=no").option("grow") == "no"
    assert parse_one("https://h/log.txt").option("grow") is None
    assert error_of("https://h/log.txt grow=maybe") == "<urls> line 1: option 'grow' must be no or yes"
