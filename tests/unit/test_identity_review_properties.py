"""Identity review under any sequence of a hospital's changes and a reviewer's decisions.

A patient first sent under the shared number K; then, in any order, Patient versions naming K, P, Q or no
number, deletes of the Patient, Observations, and decisions (on the review open then, or on a stale one).
Whatever happens: nothing goes anywhere while a review is open, what is routed goes to the Patient the
local patient has once the step is done, every record is routed, held or reported not applied (never
silently dropped, never routed twice), Observations keep their order, and a decision that was applied
leaves no review open.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from pipeline.identity import (
    IdentityDecision,
    IdentityDecisionError,
    IdentityState,
    apply_decision,
    global_patient_key,
    resolve_identity,
)
from pipeline.normalize import SourcePosition, normalize_change
from pipeline.records import NormalizedResource, decode
from tests.conftest import debezium_value, first_of, row

pytestmark = pytest.mark.unit
KVNR = "http://fhir.de/sid/gkv/kvid-10"
POS = SourcePosition("cdc.site-a.fhir.resource", 0, 7)
BASE = first_of("ADT-A01-01", "Patient")
NUMBERS = {"K": "A123456789", "P": "Z000000001", "Q": "Y000000002", "none": None}
KEYS = {name: (global_patient_key(KVNR, value) if value else None) for name, value in NUMBERS.items()}
LOCAL = f"site-a|{BASE['id']}"


def patient(number: str | None) -> dict:
    others = [i for i in BASE.get("identifier", []) if i.get("system") != KVNR]
    return {**BASE, "identifier": others + ([{"system": KVNR, "value": number}] if number else [])}


def observation(n: int) -> dict:
    subject = {"reference": f"Patient/{BASE['id']}"}
    return {
        "resourceType": "Observation",
        "id": f"obs-{n}",
        "status": "final",
        "code": {"text": "x"},
        "subject": subject,
    }


def record(config, resource: dict, op: str, version: int) -> NormalizedResource:
    before, after = (row(resource, version), None) if op == "d" else (None, row(resource, version))
    return normalize_change(config.sites["site-a"], debezium_value(op, before, after), POS)


STEP = st.one_of(
    st.tuples(st.just("patient"), st.sampled_from(sorted(NUMBERS))),
    st.tuples(st.just("observation"), st.none()),
    st.tuples(st.just("delete"), st.none()),
    st.tuples(st.just("decision"), st.tuples(st.sampled_from(["accept", "reject"]), st.booleans())),
)


def decision_on(entry: dict, action: str, current: bool, version: int) -> IdentityDecision:
    """On the review open now (current), or on one that is not (the hospital changed it since)."""
    review = entry.get("review")
    if current and review is not None:
        return IdentityDecision(action, review["number"], entry["key"], review["proposed"], "reviewer", "x", version)
    return IdentityDecision(action, 1, KEYS["K"], KEYS["P"], "reviewer", "x", version)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(STEP, max_size=10))
def test_identity_review_never_misroutes_loses_or_reorders(config, steps) -> None:
    site, state = config.sites["site-a"], IdentityState({}, {})
    first = resolve_identity(state, record(config, patient(NUMBERS["K"]), "c", 1), site)
    assert [r.patient_key for r in first.routed] == [KEYS["K"]]
    fate: dict[tuple[str, int | None], str] = {}
    routed_observations: list[int] = []
    for version, (kind, arg) in enumerate(steps, start=2):
        entry, decided = dict(state.keys.get(LOCAL, {})), False
        if kind == "decision":
            action, current = arg
            try:
                out = apply_decision(
                    state,
                    record(config, patient(None), "u", version),
                    site,
                    decision_on(entry, action, current, version),
                )
            except IdentityDecisionError:
                assert not current or "review" not in entry, "a decision on the open review was refused"
                continue
            decided = True
        else:
            resource, op = {"patient": (patient(NUMBERS.get(arg or "")), "u"), "delete": (patient(None), "d")}.get(
                kind, (observation(version), "c")
            )
            incoming = record(config, resource, op, version)
            fate[(incoming.resource_type, incoming.source_version)] = "new"
            out = resolve_identity(state, incoming, site)
        after = state.keys.get(LOCAL, {})
        note(f"{kind} {arg}: {after}")
        for routed in out.routed:
            key = (routed.resource_type, routed.source_version)
            assert fate.get(key) in ("new", "held"), f"{key} routed twice, or never sent"
            fate[key] = "routed"
            assert routed.patient_key == after.get("key"), "routed to a Patient the local patient is not"
            if routed.resource_type == "Observation":
                routed_observations.append(int(routed.source_version or 0))
        for item, _ in out.not_applied:
            fate[(item.resource_type, item.source_version)] = "not applied"
        held = [decode(bytes.fromhex(i), NormalizedResource) for i in state.held.get(LOCAL, [])]
        for item in held:
            fate[(item.resource_type, item.source_version)] = "held"
        if "review" in after:
            assert not out.routed and held, "a review is open: nothing goes anywhere, and what waits is held"
        if decided:
            assert "review" not in after, "an applied decision left a review open"
    lost = [key for key, f in fate.items() if f == "new"]
    assert not lost, f"neither routed, held nor reported: {lost}"
    assert routed_observations == sorted(routed_observations), "Observations released out of their order"
