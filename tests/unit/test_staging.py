"""Staged table changes: held back until the outputs they describe are acknowledged, per record or per batch."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.staging import Staged, current, pending, staged_batch

pytestmark = pytest.mark.unit


def test_a_records_changes_reach_the_table_only_when_applied() -> None:
    table = {"a": 1}
    staged = Staged(table)
    staged["b"] = 2
    del staged["a"]
    assert table == {"a": 1} and dict(staged) == {"b": 2}
    staged.apply()
    assert table == {"b": 2}


def test_in_a_batch_each_record_sees_the_ones_before_it_and_the_table_only_acknowledged_ones() -> None:
    table = {"a": 1}
    with staged_batch() as batch:
        first = Staged(table)
        first["b"] = 2
        first.apply()  # the first record is done; its outputs are not yet acknowledged
        second = Staged(table)
        assert second["b"] == 2 and current(table)["b"] == 2
        del second["a"]
        second.apply()
        assert table == {"a": 1}  # nothing reached the table yet
        assert dict(current(table)) == {"b": 2}
    assert current(table) is table  # outside the batch: the table itself
    for _, changed, key, value in batch.final_changes():  # the batch's outputs are acknowledged
        if value is None:
            changed.pop(key, None)
        else:
            changed[key] = value
    assert table == {"b": 2}


def test_each_change_is_applied_as_the_record_that_made_it() -> None:
    table: dict[str, int] = {}
    record = {"now": "event@p0"}
    with staged_batch(lambda: record["now"]) as batch:
        for name, partition in (("x", 0), ("y", 1), ("x", 2)):
            record["now"] = f"{name}@p{partition}"
            staged = Staged(table)
            staged[name] = partition
            staged.apply()
    # Each key's last change, made while its record was current (a Faust table's changelog partition).
    assert [(context, key, value) for context, _, key, value in batch.final_changes()] == [
        ("y@p1", "y", 1),
        ("x@p2", "x", 2),
    ]


def test_one_key_in_two_partitions_of_one_batch_stays_two_keys() -> None:
    """A batch holds records of several partitions, and since identity moves one key can be in two (a resource
    parked both where its patient was and where it is now): each partition reads and applies its own."""
    from types import SimpleNamespace

    table: dict[str, list[str]] = {}  # a Faust table is one per partition; applied here per context below
    record: dict[str, object] = {}

    def at(partition: int) -> None:
        record["now"] = SimpleNamespace(message=SimpleNamespace(partition=partition), name=f"p{partition}")

    with staged_batch(lambda: record.get("now")) as batch:
        at(4)
        staged = Staged(table)
        staged["Encounter/enc-9"] = ["obs-3 waits in p4"]
        staged.apply()
        at(0)
        staged = Staged(table)
        assert "Encounter/enc-9" not in staged  # p4's list is not p0's
        staged["Encounter/enc-9"] = ["obs-1 waits in p0"]
        staged.apply()
        at(0)
        staged = Staged(table)
        del staged["Encounter/enc-9"]  # p0's record moved away
        staged.apply()
        at(4)
        assert current(table)["Encounter/enc-9"] == ["obs-3 waits in p4"]
        assert sorted(pending(table), key=str) == [
            ("Encounter/enc-9", None),
            ("Encounter/enc-9", ["obs-3 waits in p4"]),
        ]
    assert sorted((context.name, key, value) for context, _, key, value in batch.final_changes()) == [
        ("p0", "Encounter/enc-9", None),
        ("p4", "Encounter/enc-9", ["obs-3 waits in p4"]),
    ]


def test_a_batch_that_is_not_applied_leaves_the_table_as_it_was() -> None:
    table = {"a": 1}
    with staged_batch():
        staged = Staged(table)
        staged["a"] = 5
        staged.apply()
    assert table == {"a": 1}  # a crash before the acknowledgement: the batch is processed again


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.one_of(st.none(), st.integers())), max_size=30))
def test_a_batch_applies_what_the_same_records_would_apply_one_at_a_time(changes: list[tuple[str, int | None]]) -> None:
    one_at_a_time: dict[str, int] = {"a": 0}
    batched: dict[str, int] = {"a": 0}
    with staged_batch() as batch:
        for key, value in changes:
            staged = Staged(batched)
            if value is None:
                staged.pop(key, None)
            else:
                staged[key] = value
            staged.apply()
    for key, value in changes:
        if value is None:
            one_at_a_time.pop(key, None)
        else:
            one_at_a_time[key] = value
    for _, changed, key, value in batch.final_changes():
        if value is None:
            changed.pop(key, None)
        else:
            changed[key] = value
    assert batched == one_at_a_time
