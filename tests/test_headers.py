"""Header and message parsing: every odd value a server may send gives a number or None, never an error."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from throttled_openai.headers import parse_duration, parse_rate_limit_headers, parse_retry_after, parse_try_again


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("12ms", 0.012),
        ("1.146s", 1.146),
        ("7.66s", 7.66),
        ("6m0s", 360.0),
        ("1h23m45.6s", 5025.6),
        ("1m2.5s", 62.5),
        ("0s", 0.0),
        ("7", 7.0),
        ("0.5", 0.5),
        ("250us", 0.00025),
        (" 3s ", 3.0),
    ],
)
def test_go_durations_and_plain_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [None, "", "-1", "-1s", "banana", "1x", "s", "ms5", "nan", "inf", "1e9", "3h"])
def test_unusable_durations_are_none(text: object) -> None:
    assert parse_duration(text) is None  # type: ignore[arg-type]


def test_full_openai_header_set() -> None:
    parsed = parse_rate_limit_headers(
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-remaining-tokens": "149984",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    assert (parsed.limit_requests, parsed.limit_tokens) == (60, 150000)
    assert (parsed.remaining_requests, parsed.remaining_tokens) == (59, 149984)
    assert (parsed.reset_requests, parsed.reset_tokens) == (1.0, 360.0)
    assert parsed.retry_after is None and not parsed.empty


def test_azure_style_partial_and_odd_values() -> None:
    parsed = parse_rate_limit_headers(
        {
            "x-ratelimit-remaining-requests": "-1",
            "x-ratelimit-remaining-tokens": "9000",
            "x-ratelimit-limit-tokens": "0",
            "x-ratelimit-reset-tokens": "banana",
            "x-ms-retry-after-ms": "1500",
        }
    )
    assert parsed.remaining_requests is None  # -1 means "unknown", not "none left"
    assert parsed.remaining_tokens == 9000
    assert parsed.limit_tokens is None  # a zero limit is no limit we can use
    assert parsed.reset_tokens is None
    assert parsed.retry_after == pytest.approx(1.5)


def test_no_headers_is_empty() -> None:
    assert parse_rate_limit_headers({}).empty


def test_retry_after_precedence() -> None:
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "3"}) == pytest.approx(0.25)
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert parse_retry_after({"retry-after": "-2"}) is None


@pytest.mark.parametrize(
    ("message", "seconds"),
    [
        ("Rate limit reached ... Used 199821, Requested 2295. Please try again in 634ms. Visit ...", 0.634),
        ("... requests per day (RPD) ... Please try again in 28m48s. Visit", 1728.0),
        ("Please try again in 1.4s.", 1.4),
        ("Please try again in 20s", 20.0),
        ("no hint here", None),
        ("", None),
    ],
)
def test_try_again_in_messages(message: str, seconds: object) -> None:
    assert parse_try_again(message) == (pytest.approx(seconds) if seconds is not None else None)


@given(st.text(max_size=30))
def test_parse_duration_never_raises(text: str) -> None:
    value = parse_duration(text)
    assert value is None or value >= 0


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
                "retry-after",
                "retry-after-ms",
            ]
        ),
        st.text(max_size=20),
    )
)
def test_header_parser_never_raises_and_never_goes_negative(headers: dict) -> None:
    parsed = parse_rate_limit_headers(headers)
    for value in vars(parsed).values():
        assert value is None or value >= 0


@given(st.integers(0, 1), st.integers(0, 59), st.integers(0, 59), st.integers(0, 999))
def test_go_duration_round_trip(h: int, m: int, s: int, ms: int) -> None:
    text = (f"{h}h" if h else "") + f"{m}m{s}.{ms:03d}s"
    assert parse_duration(text) == pytest.approx(h * 3600 + m * 60 + s + ms / 1000)
