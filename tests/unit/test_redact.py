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
