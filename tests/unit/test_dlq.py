"""`cdrsync dlq`: the record ids ops type (`<partition>:<offset>`, as `list` shows them, also for `conflicts`),
and what a dead letter is said to be about."""

from __future__ import annotations

import pytest

from pipeline.config import Config
from pipeline.deadletter import FailureInfo
from pipeline.dlq import DeadLetter, DeadLetterFilter, _site_and_type, parse_position, record_ids
from pipeline.errors import CdrsyncError

pytestmark = pytest.mark.unit


def test_an_id_is_a_partition_and_an_offset() -> None:
    assert parse_position("3:1207") == (3, 1207)


def test_ids_as_typed_match_the_ids_list_shows() -> None:
    assert record_ids([" 3:01207", "0:5", "0:5"]) == frozenset({"3:1207", "0:5"})
    assert record_ids(None) == frozenset()


@pytest.mark.parametrize("typed", ["latest", "3", "3:", ":7", "3:-1", "a:1", "3:1:2"])
def test_anything_else_is_refused_naming_it(typed: str) -> None:
    with pytest.raises(CdrsyncError, match=f"{typed!r} is not a record id: ids are partition:offset"):
        parse_position(typed)


def _failed_at(topic: str, stage: str) -> FailureInfo:
    return FailureInfo(stage, "schema", "malformed", 1, 0, 0, topic, 2, 40)


def test_a_dead_letter_from_a_sites_source_topic_names_the_site_and_the_rows_type(config: Config) -> None:
    envelope = {"after": {"resource_type": "Observation", "id": "o-1"}, "op": "c"}
    topic = config.source_topic(config.sites["site-a"])
    assert _site_and_type(config, envelope, _failed_at(topic, "normalize")) == ("site-a", "Observation")


def test_a_dead_letter_from_another_topic_is_listed_not_a_crash(config: Config) -> None:
    """The audit store dead-letters an audit event it cannot store, from audit.v1: `dlq list` crashed on it."""
    event = {"step": "written", "site": "site-b", "resource_type": "Condition", "target_id": "c-1"}
    assert _site_and_type(config, event, _failed_at("audit.v1", "audit")) == ("site-b", "Condition")
    assert _site_and_type(config, b"\x00garbage", _failed_at("audit.v1", "audit")) == ("", "")


def _letter(decoded: object, stage: str = "writeback") -> DeadLetter:
    failure = _failed_at("fhir.writeback.v1", stage)
    return DeadLetter(2, 40, 0, None, None, [], failure, decoded, "central", "QuestionnaireResponse", None)


def test_write_back_dead_letters_are_chosen_by_the_hospital_they_were_bound_for() -> None:
    """After one hospital's outage ops replay its write-backs alone (`dlq replay --target site-a`)."""
    for_a = _letter({"_schema": "routed_resource", "site": "central", "target": "site-a"})
    for_b = _letter({"_schema": "routed_resource", "site": "central", "target": "site-b"})
    envelope = _letter({"after": {"target": "site-a"}}, stage="normalize")  # a row's column is not a target
    only_a = DeadLetterFilter(target="site-a")
    assert [only_a.matches(x) for x in (for_a, for_b, envelope)] == [True, False, False]
    assert (for_a.target, for_b.target, envelope.target) == ("site-a", "site-b", None)
    assert for_a.summary()["target"] == "site-a" and envelope.summary()["target"] is None
    assert DeadLetterFilter(site="central", target="site-b").matches(for_b)
