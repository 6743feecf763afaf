"""Secret masking rules shared by logs, error records and config."""

from __future__ import annotations

import pytest

from worker_core.redact import MASK, is_sensitive_key, mask_dsn, redact_text, redact_value


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("postgresql://app:pa55word@db:5432/x", "pa55word"),
        ("postgres://u:p%40ss@h/db?sslmode=require", "p%40ss"),
        ("host=/tmp dbname=x password=hunter22 user=u", "hunter22"),
        ("password='with space' next", "with space"),
        ('{"api_key": "sk-abc123"}', "sk-abc123"),
        ("Authorization: Bearer eyJhbGciOi.abc.def", "eyJhbGciOi.abc.def"),
        ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG", "wJalrXUtnFEMI/K7MDENG"),
        ("token: abcdef123456", "abcdef123456"),
    ],
)
def test_redact_text(text: str, secret: str) -> None:
    out = redact_text(text)
    assert secret not in out
    assert MASK in out


def test_redact_text_keeps_harmless_text() -> None:
    for text in ("postgresql://user:@/db?host=/path", "https://example.com/a@b", "all good"):
        assert redact_text(text) == text


def test_known_secret_values_are_masked_anywhere() -> None:
    assert redact_text("the key is zz-top-123 ok", ["zz-top-123"]) == "the key is *** ok"


def test_redact_value_nested() -> None:
    value = {
        "headers": {"Authorization": "Bearer x" * 3, "X-Api-Key": "k1", "Accept": "json"},
        "items": [{"password": "p"}, "postgresql://a:b@c/d"],
        "token_count": 12,
    }
    out = redact_value(value)
    assert out["headers"] == {"Authorization": MASK, "X-Api-Key": MASK, "Accept": "json"}
    assert out["items"] == [{"password": MASK}, "postgresql://a:***@c/d"]
    assert out["token_count"] == 12  # numbers under secret-sounding keys are not secrets


def test_sensitive_keys() -> None:
    for key in ("password", "DB_PASSWORD", "api-key", "aws_secret_access_key", "Authorization"):
        assert is_sensitive_key(key)
    assert not is_sensitive_key("document_id")
    assert is_sensitive_key("my_custom", extra=["custom"])


def test_mask_dsn() -> None:
    assert mask_dsn("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"


# -- one redactor, every libpq syntax (issue 12) ----------------------------------------
import re  # noqa: E402
from collections.abc import Callable  # noqa: E402
from urllib.parse import quote  # noqa: E402

from hypothesis import assume, example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from psycopg.conninfo import conninfo_to_dict  # noqa: E402

from worker_core.redact import Redactor  # noqa: E402

# Any printable character, blanks, quotes and backslashes included (libpq cannot carry
# NUL; other control characters are left out because no DSN holds them in practice).
PASSWORDS = st.text(
    alphabet=st.characters(
        min_codepoint=32, max_codepoint=0x2FFF, blacklist_categories=("Cs", "Cc")
    ),
    min_size=1,
    max_size=24,
).filter(lambda p: p.strip() == p or p.strip())
NAMES = st.from_regex(r"[a-z][a-z0-9]{2,8}", fullmatch=True)


def _kv_unquoted(value: str) -> str:
    """libpq's unquoted form: backslash before blanks, quotes and backslashes."""
    return re.sub(r"([\s'\\])", r"\\\1", value)


def _kv_quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _dsn_forms(user: str, host: str, db: str, pw: str) -> list[tuple[str, str]]:
    """(DSN, what it must look like masked) in every libpq syntax."""
    enc = quote(pw, safe="")
    return [
        (
            f"postgresql://{user}:{enc}@{host}:5432/{db}",
            f"postgresql://{user}:***@{host}:5432/{db}",
        ),
        (
            f"postgres://{user}:{enc}@{host}/{db}?sslmode=require",
            f"postgres://{user}:***@{host}/{db}?sslmode=require",
        ),
        (
            f"postgresql://{user}:{enc}@{host}:5432,{host}2:5433/{db}?target_session_attrs=any",
            f"postgresql://{user}:***@{host}:5432,{host}2:5433/{db}?target_session_attrs=any",
        ),
        (
            f"postgresql://{user}@{host}/{db}?password={enc}&sslmode=require",
            f"postgresql://{user}@{host}/{db}?password=***&sslmode=require",
        ),
        (
            f"host={host} user={user} password={_kv_unquoted(pw)} dbname={db}",
            f"host={host} user={user} password=*** dbname={db}",
        ),
        (
            f"host={host} password = {_kv_unquoted(pw)} dbname={db}",
            f"host={host} password = *** dbname={db}",
        ),
        (
            f"host={host} user={user} password={_kv_quoted(pw)} dbname={db}",
            f"host={host} user={user} password='***' dbname={db}",
        ),
        (
            f"host={host},{host}2 port=5432,5433 password={_kv_quoted(pw)} dbname={db}",
            f"host={host},{host}2 port=5432,5433 password='***' dbname={db}",
        ),
        (f"password={_kv_unquoted(pw)}", "password=***"),
    ]


@given(NAMES, NAMES, NAMES, PASSWORDS)
# Found by `make fuzz`: a user or host named like a secret key ("pwd:" in a URL's
# authority was read as a pair and masked the rest), and a password that is one
# double quote (read as an unclosed quote, which was kept).
@example(user="pwd", host="a00", db="a00", pw="8")
@example(user="a00", host="pwd", db="a00", pw="K")
@example(user="a00", host="a00", db="a00", pw='"')
@example(user="a00", host="a00", db="a00", pw='" 000')  # quoted, then repr'd
@example(user="a00", host="a00", db="a00", pw='""')
@example(user="a00", host="a00", db="a00", pw="\\")
@example(user="a00", host="a00", db="a00", pw="'")
@example(user="a00", host="a00", db="a00", pw='""0')
def test_property_password_never_appears_in_any_libpq_syntax(
    user: str, host: str, db: str, pw: str
) -> None:
    for dsn, masked in _dsn_forms(user, host, db, pw):
        skeleton = masked.replace("***", "")
        assume(pw not in skeleton and quote(pw, safe="") not in skeleton)
        assert conninfo_to_dict(dsn)["password"] == pw, dsn  # the generator speaks libpq
        out = redact_text(dsn)
        # The mask starts where the password does; what follows it is the DSN's own
        # tail. (The mask may swallow more of the tail: after an escaped backslash,
        # "\\\\ " reads as the end of the value in libpq but as an escaped blank in a
        # repr'd DSN, and the redactor takes the safe reading.)
        # An unquoted value that starts with a quote (escaped or not) is read as
        # quoted (to the end of the text): more masked, nothing leaked.
        head, tail = masked.split("***", 1)
        head = head.rstrip("'")  # an unclosed quote is masked with the value
        assert out.startswith(head), (dsn, out)
        rest = out[len(head) :].lstrip("'\"")
        # Quotes the redactor read around the value may stay around the mask.
        assert rest.startswith("***") and tail.endswith(rest[3:].lstrip('"')), (dsn, out)
        assert out == masked or "\\" in pw or pw.startswith(("'", '"')), (dsn, out)
        assert pw not in out.replace("***", "\x00")
        # Embedded in a sentence, a repr and a traceback line: still masked, and no
        # word of the password survives either (a tail left after an escape).
        wrappers: list[Callable[[str], str]] = [
            lambda d: f"cannot connect to {d} now",
            lambda d: repr({"dsn": d}),
            lambda d: f'  File "x", dsn={d!r}',
        ]
        for wrap in wrappers:
            text, around = wrap(dsn), wrap(masked).replace("***", "")
            out = redact_text(text).replace("***", "\x00")
            for fragment in [pw, *re.findall(r"\w{3,}", pw)]:
                if fragment not in around:
                    assert fragment not in out, (text, out)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("host=h password=Se\\ cretPw dbname=d", "host=h password=*** dbname=d"),
        ("password='a b' next", "password='***' next"),
        ("password='it\\'s here' x", "password='***' x"),
        ("password=pa'ss user=u", "password=*** user=u"),
        ("password='unclosed and more", "password=***"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p/ss@h/db", "postgresql://u:***@h/db"),
    ],
)
def test_escaped_and_quoted_forms(text: str, masked: str) -> None:
    assert redact_text(text) == masked


def test_one_redactor_everywhere() -> None:
    import worker_core.health as health
    import worker_core.logs as logs

    assert vars(logs)["Redactor"] is Redactor and vars(health)["Redactor"] is Redactor
    value = {"a": [{"dsn": "host=h password=Se\\ cretPw"}], "token": "t0k3n-x", "n": (1, 2)}
    expected = {"a": [{"dsn": "host=h password=***"}], "token": MASK, "n": [1, 2]}
    assert redact_value(value) == expected
    assert Redactor().value(value) == expected


def test_deep_values_are_cut_never_returned_raw() -> None:
    value: object = "postgresql://u:deep-secret-pw@h/db"
    for _ in range(100):
        value = {"next": [value]}
    assert "deep-secret-pw" not in repr(redact_value(value))
    assert "..." in repr(redact_value(value))
