"""Whether `cdrsync identity list` shows a review open or closed: its closing must name it (or a later one)."""

from __future__ import annotations

import pytest

from pipeline.identityreview import _closes

pytestmark = pytest.mark.unit


def closing(action: str, number: int | None, at_ms: int = 5_000) -> dict:
    return {"action": action, "review_number": number, "at_ms": at_ms}


@pytest.mark.parametrize("action", ["accepted", "rejected", "withdrawn"])
def test_a_review_is_closed_by_a_closing_of_it_or_of_a_later_review(action: str) -> None:
    assert _closes(closing(action, 2), "2", 9_999_999)
    assert _closes(closing(action, 3), "2", 9_999_999)


def test_a_closing_of_an_earlier_review_leaves_a_new_one_open_whatever_the_clocks_say() -> None:
    assert not _closes(closing("accepted", 1, at_ms=9_999_999), "2", 1_000)


def test_a_refusal_or_no_closing_leaves_it_open() -> None:
    assert not _closes(None, "1", 1_000)
    assert not _closes({"action": "refused", "decided_ms": 1, "reason": "stale"}, "1", 1_000)


def test_a_review_recorded_before_reviews_were_numbered_is_compared_by_time() -> None:
    assert _closes(closing("rejected", None, at_ms=2_000), None, 1_000)
    assert not _closes(closing("rejected", None, at_ms=500), None, 1_000)
