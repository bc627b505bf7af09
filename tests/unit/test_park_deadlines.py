"""Park expiry through ParkDeadlines (pipeline/ordering.py): the same records expire as when every park list
is read, but only the due ones are read; parks from before a rebuild are found; a rebalance mid-rebuild
leaves the index unbuilt rather than incomplete."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ordering import OrderState, ParkDeadlines, expire_parked, order_record
from tests.unit.test_ordering import rec

pytestmark = pytest.mark.unit

LIMIT_MS = 5_000


class CountingTable(MutableMapping[str, Any]):
    """A table that counts the park lists read from it (a RocksDB read and a JSON decode each, in the worker)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.reads = 0

    def __getitem__(self, key: str) -> Any:
        value = self.data[key]
        self.reads += 1
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def __delitem__(self, key: str) -> None:
        del self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.data))

    def __len__(self) -> int:
        return len(self.data)


def indexed_state(parked: MutableMapping[str, Any] | None = None) -> OrderState:
    state = OrderState({}, parked if parked is not None else {}, {}, {}, deadlines=ParkDeadlines())
    rebuild(state)
    return state


def rebuild(state: OrderState) -> None:
    assert state.deadlines is not None
    state.deadlines.invalidate()
    assert asyncio.run(state.deadlines.rebuild(list(state.parked.items())))


def test_expiry_reads_only_the_park_lists_that_are_due() -> None:
    table = CountingTable()
    s = indexed_state(table)
    order_record(s, rec("Observation/old", ("Patient/gone",)), 1_000, partition=2)
    for n in range(1_000):
        order_record(s, rec(f"Observation/o{n}", (f"Patient/p{n}",)), 4_000, partition=2)
    table.reads = 0
    expired = expire_parked(s, 6_000, LIMIT_MS, partition=2)
    assert [(p.record.target_ref, p.missing) for p in expired] == [("Observation/old", "Patient/gone")]
    assert table.reads <= 3  # the due list (and its removal), not the 1 000 others
    table.reads = 0
    scanned = OrderState({}, table, s.waiting, {})  # the same tables without the index: every list is read
    assert expire_parked(scanned, 6_000, LIMIT_MS, partition=2) == []
    assert table.reads >= 1_000
    expired = expire_parked(s, 9_000, LIMIT_MS, partition=2)
    assert len(expired) == 1_000 and not table.data


def test_parks_made_before_the_index_was_built_are_found_by_the_rebuild() -> None:
    s = OrderState({}, {}, {}, {})
    order_record(s, rec("Observation/o1", ("Patient/p9",)), 1_000, partition=4)
    s.deadlines = ParkDeadlines()  # a worker started (or was given partitions) with these parks in its table
    rebuild(s)
    assert expire_parked(s, 5_999, LIMIT_MS, partition=4) == []
    [expired] = expire_parked(s, 6_000, LIMIT_MS, partition=4)
    assert (expired.record.target_ref, expired.since_ms) == ("Observation/o1", 1_000)


def test_a_rebalance_during_the_rebuild_leaves_the_index_unbuilt() -> None:
    deadlines = ParkDeadlines()
    entry = {"record": "", "ref": "Observation/o1", "since_ms": 0, "partition": 0, "completion": False}

    def parked() -> Iterator[tuple[str, list[dict[str, Any]]]]:
        for n in range(600):
            if n == 300:
                deadlines.invalidate()  # as the worker's revoke and assign signals do
            yield f"Patient/p{n}", [entry]

    assert asyncio.run(deadlines.rebuild(parked(), every=100)) is False
    assert not deadlines.built
    s = OrderState({}, {}, {}, {}, deadlines=deadlines)
    order_record(s, rec("Observation/o2", ("Patient/p1",)), 0)
    # unbuilt: every park list is read
    assert [p.record.target_ref for p in expire_parked(s, LIMIT_MS, LIMIT_MS)] == ["Observation/o2"]


def test_a_key_due_in_another_partition_is_kept_for_that_partition() -> None:
    s = OrderState({}, {}, {}, {})
    order_record(s, rec("Observation/o1", ("Patient/p9",)), 0, partition=1)
    s.deadlines = ParkDeadlines()
    asyncio.run(s.deadlines.rebuild([]))
    s.deadlines.note(3, 0, "Patient/p9")  # noted under partition 3 only, though the list's first entry is partition 1's
    assert expire_parked(s, LIMIT_MS, LIMIT_MS, partition=3) == []
    assert [p.record.target_ref for p in expire_parked(s, LIMIT_MS, LIMIT_MS, partition=1)] == ["Observation/o1"]


# Property: through any mix of parks, releases, re-parks, completions, rebuilds and expiry checks of two
# partitions, expiry through the index removes exactly what reading every park list removes.
PATIENTS = range(4)


def _resources(k: int) -> dict[str, tuple[str, ...]]:
    return {
        f"Patient/p{k}": (),
        f"Encounter/e{k}": (f"Patient/p{k}",),
        f"Observation/a{k}": (f"Patient/p{k}", f"Encounter/e{k}"),
        f"Observation/b{k}": (f"Patient/p{k}", f"Observation/a{k}"),  # soft: a completion while a{k} waits
    }


steps = st.lists(
    st.one_of(
        st.tuples(st.just("change"), st.sampled_from(PATIENTS), st.integers(0, 3), st.booleans()),
        st.tuples(st.just("wait"), st.sampled_from([0, 1, 1_000, 2_500, LIMIT_MS - 1, LIMIT_MS, 2 * LIMIT_MS])),
        st.tuples(st.just("expire"), st.sampled_from([0, 1])),
        st.tuples(st.just("rebuild")),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(steps)
def test_expiry_through_the_index_removes_what_a_full_read_removes(script: list[tuple[Any, ...]]) -> None:
    indexed, scanned = indexed_state(), OrderState({}, {}, {}, {})
    now, versions = 0, dict[str, int]()
    for step in script:
        if step[0] == "change":
            _, k, which, delete = step
            ref, deps = list(_resources(k).items())[which]
            versions[ref] = versions.get(ref, 0) + 1
            record = rec(ref, () if delete else deps, op="DELETE" if delete else "CREATE", version=versions[ref])
            got = order_record(indexed, record, now, partition=k % 2)
            assert got == order_record(scanned, record, now, partition=k % 2)
        elif step[0] == "wait":
            now += step[1]
        elif step[0] == "expire":
            through_index = expire_parked(indexed, now, LIMIT_MS, partition=step[1])
            read_all = expire_parked(scanned, now, LIMIT_MS, partition=step[1])
            assert sorted(map(repr, through_index)) == sorted(map(repr, read_all))
        else:
            rebuild(indexed)
        assert indexed.parked == scanned.parked and indexed.waiting == scanned.waiting
