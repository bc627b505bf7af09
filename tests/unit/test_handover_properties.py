"""The order stage and the sink across partitions under any sequence of a hospital's changes and accepted identity
reviews.

One hospital patient, whose central Patient changes among three (each in its own partition of the order stage, each
with its own tables, and its own sink) whenever a reviewer accepts a move; the hospital meanwhile sends encounters,
conditions and observations (an observation in an encounter, a hard dependency; naming a condition or another
observation, a soft one: observations naming each other are deleted as one), deletes observations, Debezium sends
an earlier change again, and every message between the stages arrives in any order Kafka allows (in order per
sender and partition): a decision may come while the previous Patient's partition, or its sink, still lags far
behind (a back-load), and the next decision before the first one's hand-over arrived. Whatever happens, once
everything is delivered: nothing is left parked or waiting at a sink, and the central CDR ends with the latest
version of every resource, complete (no pending reference), never released before an encounter it is in. The
stage's code is the worker's (`order_record`, `order_move`, `take_over`, `redirect`, `hold_for_handover`,
`is_stale`, `merge_patient`), as agents/stages.py `_order_one` calls it; the sinks follow pipeline/sink.py's rules
(below).
"""

from __future__ import annotations

from collections import defaultdict, deque
from itertools import count
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from pipeline.merge import merge_patient
from pipeline.ordering import PENDING_REFERENCE_SYSTEM, OrderState, is_stale, order_record
from pipeline.patientmove import (
    MOVE,
    handover_notice,
    hold_for_handover,
    is_handover,
    order_move,
    redirect,
    take_over,
)
from pipeline.records import RoutedResource, decode, encode
from tests.casebuilder import move_of, routed_record

pytestmark = pytest.mark.unit
KEYS = ["a0000000-0000-5000-8000-000000000000", "b0000000-0000-5000-8000-000000000000", "c0" + "0" * 34]
PARTITION = {key: n for n, key in enumerate(KEYS)}  # each central Patient in its own partition
OBSERVATIONS, ENCOUNTERS, CONDITIONS = ["o1", "o2", "o3"], ["e1", "e2"], ["c1", "c2"]
KIND = {**dict.fromkeys(OBSERVATIONS, "Observation"), **dict.fromkeys(ENCOUNTERS, "Encounter")}
KIND |= dict.fromkeys(CONDITIONS, "Condition")

STEP = st.one_of(
    st.tuples(
        st.just("observation"),
        st.sampled_from(OBSERVATIONS),
        st.sampled_from([None, *ENCOUNTERS]),
        st.sampled_from([None, *CONDITIONS, *OBSERVATIONS]),  # naming another observation: a cycle may form
    ),
    st.tuples(st.just("encounter"), st.sampled_from(ENCOUNTERS)),
    st.tuples(st.just("condition"), st.sampled_from(CONDITIONS)),
    st.tuples(st.just("delete"), st.sampled_from(OBSERVATIONS)),
    st.tuples(st.just("move"), st.sampled_from(KEYS)),
    st.tuples(st.just("resend"), st.sampled_from(OBSERVATIONS + ENCOUNTERS)),
    st.tuples(st.just("deliver"), st.sampled_from(range(3)), st.sampled_from(["identity", 0, 1, 2])),
    st.tuples(st.just("write"), st.sampled_from(range(3))),
)


class Pipeline:
    """The order stage's partitions, the messages on their way to them, and what each released, in one order."""

    def __init__(self, other_hospital: bool) -> None:
        self.states = [OrderState({}, {}, {}, {}) for _ in KEYS]
        self.patients: list[dict[str, Any]] = [{} for _ in KEYS]  # patient_sources_by_patient_key, per partition
        self.inbox: dict[int, dict[Any, deque[RoutedResource]]] = {n: defaultdict(deque) for n in range(3)}
        self.released: list[tuple[int, RoutedResource]] = []  # (partition, record), in the order of release
        self.sinks = [Sink() for _ in KEYS]  # each partition's sink: what its order stage released, in order
        self.target = Target()
        self.lsn = count(100)
        self.key = KEYS[0]
        self.sent: dict[str, RoutedResource] = {}  # each resource's latest version sent by the hospital
        self.named: set[str] = set()  # what any version sent names
        self.history: dict[str, list[tuple[tuple[str | None, ...], bool, int]]] = defaultdict(list)
        self.decided_at = 0  # the position when the last review was decided
        self.send(self.patient_version(self.key))
        if other_hospital:  # another hospital holds the first Patient too: a move updates it, never deletes it
            body = {"resourceType": "Patient", "id": KEYS[0], "identifier": [{"system": "urn:b", "value": "b-1"}]}
            self.send(routed_record(body, site="site-b", source_id="b-1", patient_key=KEYS[0], source_lsn=1))

    def patient_version(self, key: str) -> RoutedResource:
        body = {"resourceType": "Patient", "id": key, "identifier": [{"system": "urn:a", "value": "a-1"}]}
        return routed_record(body, site="site-a", source_id="a-1", patient_key=key, source_lsn=next(self.lsn))

    def send(self, record: RoutedResource, sender: Any = "identity") -> None:
        self.inbox[PARTITION[record.patient_key]][sender].append(decode(encode(record), RoutedResource))

    def change(self, name: str, *deps: str | None, delete: bool = False, lsn: int | None = None) -> None:
        """The hospital's change of a resource (lsn: an earlier one, sent again), routed to the patient's Patient."""
        kind, key = KIND[name], self.key
        refs = [d for d in deps if d]
        body = {
            "resourceType": kind,
            "id": name,
            "subject": {"reference": f"Patient/{key}"},
            **({"encounter": {"reference": f"Encounter/{refs[0]}"}} if refs and refs[0] in ENCOUNTERS else {}),
            "focus": [{"reference": f"{KIND[d]}/{d}"} for d in refs if d not in ENCOUNTERS],
        }
        dependencies = sorted({f"Patient/{key}", *(f"{KIND[d]}/{d}" for d in refs)})
        record = routed_record(
            body,
            site="site-a",
            resource_type=kind,
            source_id=name,
            target_id=name,
            patient_key=key,
            op="DELETE" if delete else "UPDATE",
            source_lsn=next(self.lsn) if lsn is None else lsn,
            dependencies=[] if delete else dependencies,
        )
        if lsn is not None:  # Debezium sending a change again (after Kafka Connect died): not a new version
            self.send(record)
            return
        self.history[name].append((deps, delete, record.source_lsn))
        self.sent[name] = record
        self.named |= {d.split("/", 1)[1] for d in record.dependencies if not d.startswith("Patient/")}
        self.send(record)

    def naming_deleted(self) -> list[str]:
        """Observations whose latest version names one the hospital deleted."""
        deleted = {f"Observation/{n}" for n, r in self.sent.items() if r.is_delete}
        return sorted(n for n, r in self.sent.items() if not r.is_delete and deleted & set(r.dependencies))

    def resend(self, name: str) -> None:
        """Debezium sends the change before the latest again (a re-send after Kafka Connect died). It re-sends
        what followed its last flushed offset (flushed every minute): never a change made before a review's
        decision that came minutes or hours later."""
        if len(self.history[name]) >= 2:
            deps, delete, lsn = self.history[name][-2]
            if lsn > self.decided_at:
                self.change(name, *deps, delete=delete, lsn=lsn)

    def move(self, new: str) -> None:
        """A reviewer accepts that the hospital's patient is the person of `new`: the identity stage sends the
        notice and the accepted Patient version to it and the MOVE to the Patient it had (agents/stages.py
        `_deliver_identity`). Nothing waits for the stages to catch up: the MOVE and its hand-over, the records
        sent on, the hospital's next records and the sinks' writes race each other."""
        if new == self.key:
            return
        lsn = next(self.lsn)
        move = move_of(self.key, new, lsn=lsn, decided_ms=lsn)
        self.send(handover_notice(move))
        self.send(self.patient_version(new))
        self.send(move)
        self.key = new
        self.decided_at = lsn

    def deliver(self, partition: int, sender: Any) -> bool:
        queue = self.inbox[partition].get(sender)
        if not queue:
            return False
        self.process(partition, queue.popleft())
        return True

    def process(self, partition: int, incoming: RoutedResource) -> None:
        """What agents/stages.py `_order_one` does with one record."""
        state, patients = self.states[partition], self.patients[partition]
        if is_stale(state, incoming):
            return
        handover: list[RoutedResource] = []
        if is_handover(incoming):
            releasable, redirected, handover, _ = take_over(state, patients, incoming, 0, partition)
        elif incoming.op == MOVE:
            releasable, redirected, handover, _ = order_move(state, patients, incoming, 0, partition)
        elif (elsewhere := redirect(patients, incoming)) is not None:
            releasable, redirected = [], [elsewhere]
        elif hold_for_handover(state, patients, incoming, 0, partition, 3_600_000):
            releasable, redirected = [], []
        else:
            releasable, redirected = order_record(state, merge_patient(patients, incoming), 0, partition), []
        for record in releasable:
            assert PARTITION[record.patient_key] == partition
            self.released.append((partition, record))
            self.sinks[partition].queue.append(record)
        for record in [*handover, *redirected]:  # in this order, as the stage sends them
            self.send(record, sender=partition)

    def write(self, partition: int) -> bool:
        return self.sinks[partition].step(self.target)

    def drain(self) -> None:
        while any(self.deliver(p, sender) for p in range(3) for sender in list(self.inbox[p])) or any(
            self.write(p) for p in range(3)
        ):
            pass


class Target:
    """The central CDR as the sinks leave it: each resource's version (by its change), and for one deleted, the
    position of the last version it held (its history)."""

    def __init__(self) -> None:
        self.held: dict[str, RoutedResource] = {}
        self.deleted_after: dict[str, int] = {}

    def lacks(self, name: str, awaits: int | None) -> bool:
        """Whether the target lacks the change a delete awaits (`_holds`: neither it nor a later one there, and
        the resource not deleted)."""
        there = self.held.get(name)
        gone = there is None and name in self.deleted_after
        return awaits is not None and not gone and (there is None or (there.source_lsn or 0) < awaits)

    def apply(self, record: RoutedResource) -> bool:
        """Write or delete as pipeline/sink.py does; False when the target refuses for now (the sink retries)."""
        name, lsn = record.target_id, record.source_lsn or 0
        there = self.held.get(name)
        if record.is_delete:
            awaited = [(name, record.awaits_lsn), *((a["ref"].split("/", 1)[1], a["lsn"]) for a in record.awaits_with)]
            if any(self.lacks(member, awaits) for member, awaits in awaited):
                return False  # `_delete`: a change it awaits is not at the target yet
            if there is not None and (there.source_lsn or 0) > lsn:
                return True  # `_newer`: a later change of the row is there
            for member in [name, *(ref.split("/", 1)[1] for ref in record.delete_with)]:  # one transaction
                if (held := self.held.pop(member, None)) is not None:
                    self.deleted_after[member] = held.source_lsn or 0
            return True
        if any(d.startswith("Encounter/") and d.split("/", 1)[1] not in self.held for d in record.dependencies):
            return False  # the target refuses a reference to what it lacks (ReferenceNotReadyError): retried
        if there is not None and (there.source_lsn or 0) > lsn:
            return True  # `_newer`
        if there is None and self.deleted_after.get(name, -1) >= lsn:
            return True  # `_deleted_since`: deleted after holding this change or a later one
        self.held[name] = record
        return True


class Sink:
    """One partition's sink: writes in order; a record the target refuses for now waits in a retry tier, and the
    later versions of the same resource wait behind it (pipeline/blocking.py); the others go on."""

    def __init__(self) -> None:
        self.queue: deque[RoutedResource] = deque()
        self.retrying: dict[str, deque[RoutedResource]] = {}

    def step(self, target: Target) -> bool:
        """Write what can be written next: a retried record, else the next one. False if nothing moved."""
        for name, waiting in list(self.retrying.items()):
            if target.apply(waiting[0]):
                waiting.popleft()
                while waiting and target.apply(waiting[0]):
                    waiting.popleft()
                if not waiting:
                    del self.retrying[name]
                return True
        if not self.queue:
            return False
        record = self.queue.popleft()
        if record.resource_type in ("Patient", "Provenance") or record.op == MOVE:
            return True
        if record.target_id in self.retrying:
            self.retrying[record.target_id].append(record)
        elif not target.apply(record):
            self.retrying[record.target_id] = deque([record])
        return True


# Two observations naming each other, the first changed again; the first Patient's sink has written all but that
# change when the move comes. The hospital deletes both: one delete of the two, which must wait for that change.
CYCLE_DELETED_WHILE_ONE_CHANGE_IS_OWED = [
    ("observation", "o1", None, "o2"),
    ("observation", "o2", None, "o1"),
    ("observation", "o1", None, "o2"),
    *[("deliver", 0, "identity")] * 4,
    *[("write", 0)] * 3,
    ("move", KEYS[1]),
    *[("deliver", 1, "identity")] * 2,
    ("delete", "o1"),
    ("delete", "o2"),
    *[("deliver", 1, "identity")] * 2,
    ("deliver", 0, "identity"),
    ("deliver", 1, 0),
    *[("write", 1)] * 2,
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, max_size=40), other_hospital=st.booleans())
@example(steps=CYCLE_DELETED_WHILE_ONE_CHANGE_IS_OWED, other_hospital=False)
def test_moves_between_partitions_lose_reorder_or_strand_nothing(steps: list[tuple], other_hospital: bool) -> None:
    pipeline = Pipeline(other_hospital)
    for step in steps:
        note(repr(step))
        if step[0] == "observation":
            pipeline.change(step[1], step[2], step[3])
        elif step[0] in ("encounter", "condition"):
            pipeline.change(step[1])
        elif step[0] == "delete":
            if step[1] in pipeline.sent:
                pipeline.change(step[1], delete=True)
        elif step[0] == "move":
            pipeline.move(step[1])
        elif step[0] == "resend":
            pipeline.resend(step[1])
        elif step[0] == "write":
            pipeline.write(step[1])
        else:
            pipeline.deliver(step[1], step[2])
    # What observations name and the hospital never sent, it sends now (else they would rightly wait for it).
    for name in sorted(pipeline.named - set(pipeline.sent)):
        pipeline.change(name)
    # An observation still named by one the hospital keeps is never deleted at the target (it refuses): the
    # hospital deletes those too, in turn (a cycle of them is deleted as one, `delete_with`).
    while referrers := pipeline.naming_deleted():
        pipeline.change(referrers[0], delete=True)
    pipeline.drain()

    for n, state in enumerate(pipeline.states):
        assert dict(state.parked) == {}, f"left parked in partition {n}"
        assert not pipeline.sinks[n].queue and not pipeline.sinks[n].retrying, f"left at the sink of partition {n}"
    for position, (_, record) in enumerate(pipeline.released):
        if record.resource_type in ("Patient", "Provenance") or record.op == MOVE:
            continue
        for dependency in record.dependencies:  # never before an encounter it is in (in whichever partition)
            if dependency.startswith("Encounter/"):
                earlier = [r.target_ref for _, r in pipeline.released[:position]]
                assert dependency in earlier, f"{record.target_ref} released before {dependency}"
    # The central CDR as the sinks left it, each writing what its partition released, in that order, racing the
    # others (`Target.apply`: the sink's rules).
    target = pipeline.target.held
    for name, latest in pipeline.sent.items():
        there = target.get(name)
        if latest.is_delete:
            assert there is None, f"{name}: deleted at the hospital, back at central (LSN {there.source_lsn})"
            continue
        assert there is not None and there.source_lsn == latest.source_lsn, f"{name}: latest version not at central"
        assert PENDING_REFERENCE_SYSTEM not in (there.resource or ""), f"{name} left with a pending reference"
