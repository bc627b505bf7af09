from dataclasses import replace

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import EnvelopeError
from pipeline.identity import (
    DECISION_HEADER,
    ORIGIN_TAG_SYSTEM,
    IdentityDecision,
    IdentityDecisionError,
    IdentityState,
    apply_decision,
    global_patient_key,
    parse_decision,
    resolve_identity,
    shared_identifier,
)
from pipeline.ids import target_id
from pipeline.normalize import SourcePosition, normalize_change
from pipeline.references import logical_system
from tests.conftest import debezium_value, first_of, row

pytestmark = pytest.mark.unit
POS = SourcePosition("cdc.site-a.fhir.resource", 0, 7)
KVNR = "http://fhir.de/sid/gkv/kvid-10"


def with_kvnr(patient: dict, value: str | None) -> dict:
    others = [i for i in patient.get("identifier", []) if i.get("system") != KVNR]
    return {**patient, "identifier": others + ([{"system": KVNR, "value": value}] if value else [])}


def normalized(config, resource, site="site-a", op="c", version=1):
    before, after = (row(resource, version), None) if op == "d" else (None, row(resource, version))
    return normalize_change(config.sites[site], debezium_value(op, before, after), POS)


def _no_lsn(entry: dict) -> dict:
    """A local patient's entry without the source LSN of its latest Patient version (kept to refuse older ones)."""
    return {k: v for k, v in entry.items() if k != "lsn"}


def state() -> IdentityState:
    return IdentityState({}, {})


def routed(config, s, resource, site="site-a", op="c"):
    outcome = resolve_identity(s, normalized(config, resource, site, op), config.sites[site])
    return outcome.routed


PATIENT = with_kvnr(first_of("ADT-A01-01", "Patient"), "A123456789")
KEY = global_patient_key(KVNR, "A123456789")


def test_patient_id_at_central_derives_from_the_shared_identifier(config) -> None:
    [patient] = routed(config, state(), PATIENT)
    assert patient.target_id == patient.patient_key == KEY
    assert orjson.loads(patient.resource)["id"] == KEY


def test_same_person_from_two_sites_is_one_patient_and_encounters_stay_apart(config) -> None:
    s = state()
    [a] = routed(config, s, PATIENT, "site-a")
    [b] = routed(config, s, {**PATIENT, "id": "b-local-7"}, "site-b")
    assert a.target_id == b.target_id == KEY
    encounter = first_of("ADT-A01-01", "Encounter")
    [enc_a] = routed(config, s, encounter, "site-a")
    [enc_b] = routed(config, s, {**encounter, "subject": {"reference": "Patient/b-local-7"}}, "site-b")
    assert enc_a.target_id != enc_b.target_id and enc_a.patient_key == enc_b.patient_key == KEY


def test_observation_references_are_rewritten_to_target_ids(config) -> None:
    s = state()
    observation = first_of("ORU-R01-01", "Observation")
    patient = with_kvnr(first_of("ORU-R01-01", "Patient"), "B987654321")
    routed(config, s, patient)
    [result] = routed(config, s, observation)
    body = orjson.loads(result.resource)
    key = global_patient_key(KVNR, "B987654321")
    assert body["id"] == result.target_id == target_id("site-a", "Observation", observation["id"])
    assert body["subject"]["reference"] == f"Patient/{key}"
    assert f"Patient/{key}" in result.dependencies and result.patient_key == key


def test_references_to_types_not_carried_become_logical_references(config) -> None:
    s = state()
    routed(config, s, with_kvnr(first_of("ORU-R01-01", "Patient"), "B987654321"))
    observation = first_of("ORU-R01-01", "Observation")
    performers = [p["reference"] for p in observation.get("performer", [])]
    assert performers, "sample should reference practitioners/organizations"
    [result] = routed(config, s, observation)
    for original, rewritten in zip(performers, orjson.loads(result.resource)["performer"], strict=True):
        resource_type, source_id = original.split("/")
        assert "reference" not in rewritten and rewritten["type"] == resource_type
        assert rewritten["identifier"] == {"system": logical_system("site-a", resource_type), "value": source_id}


def test_origin_tag_source_identifier_and_no_server_meta(config) -> None:
    patient = {**PATIENT, "meta": {"versionId": "7", "lastUpdated": "2020-01-01T00:00:00Z"}}
    [result] = routed(config, state(), patient)
    body = orjson.loads(result.resource)
    assert {"system": ORIGIN_TAG_SYSTEM, "code": "site-a"} in body["meta"]["tag"]
    assert "versionId" not in body["meta"] and "lastUpdated" not in body["meta"]
    assert {"system": logical_system("site-a", "Patient"), "value": PATIENT["id"]} in body["identifier"]


def test_patient_without_shared_identifier_is_held_with_its_records_then_released_in_order(config) -> None:
    s = state()
    anonymous = with_kvnr(PATIENT, None)
    encounter = first_of("ADT-A01-01", "Encounter")
    out = resolve_identity(s, normalized(config, anonymous), config.sites["site-a"])
    assert out.routed == [] and "kvid-10" in out.held[0][1]
    out = resolve_identity(s, normalized(config, encounter), config.sites["site-a"])
    assert out.routed == [] and len(out.held) == 1
    out = resolve_identity(s, normalized(config, PATIENT, op="u", version=2), config.sites["site-a"])
    assert [(r.resource_type, r.target_id) for r in out.routed] == [
        ("Patient", KEY),
        ("Encounter", target_id("site-a", "Encounter", encounter["id"])),
    ]
    assert out.released == 1 and s.held == {}


OTHER_KEY = global_patient_key(KVNR, "Z000000001")
LOCAL = f"site-a|{PATIENT['id']}"
ENCOUNTER = first_of("ADT-A01-01", "Encounter")


def resolve(config, s, resource, op="u", version=2):
    return resolve_identity(s, normalized(config, resource, op=op, version=version), config.sites["site-a"])


def under_review(config):
    """A patient written under KEY whose hospital then names Z000000001 instead, and an Encounter after that."""
    s = state()
    routed(config, s, PATIENT)
    changed = resolve(config, s, with_kvnr(PATIENT, "Z000000001"))
    encounter = resolve(config, s, ENCOUNTER, op="c", version=3)
    return s, changed, encounter


def decide(config, s, action, proposed=OTHER_KEY, patient=None):
    record = normalized(config, patient or with_kvnr(PATIENT, "Z000000001"), op="u", version=2)
    number = s.keys[LOCAL]["review"]["number"] if "review" in s.keys.get(LOCAL, {}) else 1
    decision = IdentityDecision(
        action, number, KEY, proposed, "dr-review", "checked with the hospital", 1_700_000_000_000
    )
    return apply_decision(s, record, config.sites["site-a"], decision)


def test_records_of_a_patient_deleted_before_it_had_an_identifier_never_go_to_the_next_one_given_its_id(config) -> None:
    s = state()
    anonymous = with_kvnr(PATIENT, None)
    resolve(config, s, anonymous, op="c", version=1)
    resolve(config, s, ENCOUNTER, op="c", version=2)
    gone = resolve(config, s, anonymous, op="d", version=3)
    assert gone.routed == [] and [r.resource_type for r, _ in gone.not_applied] == ["Patient", "Encounter", "Patient"]
    assert all("deleted at the hospital" in reason for _, reason in gone.not_applied) and LOCAL not in s.held
    newcomer = resolve(config, s, with_kvnr(PATIENT, "Z000000001"), op="c", version=4)  # the id, given again
    assert [(r.resource_type, r.patient_key, r.is_delete) for r in newcomer.routed] == [("Patient", OTHER_KEY, False)]


def test_a_keyed_patient_id_depends_on_the_secret_and_is_not_the_unkeyed_one() -> None:
    keyed = global_patient_key(KVNR, "A123456789", "s3cret")
    assert keyed == global_patient_key(KVNR, " A123456789 ", "s3cret")  # deterministic: one person, one Patient
    assert keyed not in (
        KEY,
        global_patient_key(KVNR, "A123456789", "other"),
        global_patient_key(KVNR, "A123456780", "s3cret"),
    )


def test_shared_identifier_in_capitals_without_spaces_when_the_sites_agree_on_that_form() -> None:
    patient = with_kvnr(PATIENT, " a123 456 789 ")
    assert shared_identifier(patient, KVNR) == "a123 456 789"  # as written: another person than A123456789
    assert shared_identifier(patient, KVNR, "uppercase-no-spaces") == "A123456789"
    assert shared_identifier(with_kvnr(PATIENT, " \t "), KVNR, "uppercase-no-spaces") is None


def test_a_site_folding_its_identifiers_routes_a_number_written_in_small_letters_to_the_same_patient(config) -> None:
    from pipeline.config import IdentityConfig

    site = config.sites["site-a"]
    folding = site.model_copy(
        update={"identity": IdentityConfig(shared_identifier_system=KVNR, shared_identifier_form="uppercase-no-spaces")}
    )
    record = normalized(config, with_kvnr(PATIENT, "a 123456789"))
    assert [r.target_id for r in resolve_identity(state(), record, folding).routed] == [KEY]
    assert [r.target_id for r in resolve_identity(state(), record, site).routed] != [KEY]


def test_changed_shared_identifier_goes_to_review_and_is_not_applied(config) -> None:
    s, out, _ = under_review(config)
    assert out.routed == [] and "changed" in out.review[0][1]
    assert _no_lsn(s.keys[LOCAL]) == {"key": KEY, "reviews": 1, "review": {"proposed": OTHER_KEY, "number": 1}}
    [review] = out.review
    assert (review.previous_key, review.proposed_key, review.number) == (KEY, OTHER_KEY, 1)


def test_records_after_an_identity_change_wait_for_the_review_instead_of_going_to_either_patient(config) -> None:
    s, _, encounter = under_review(config)
    assert encounter.routed == [] and "identity review" in encounter.held[0][1]
    assert [r.resource_type for r in (decode_held(s))] == ["Patient", "Encounter"]
    again = resolve(config, s, with_kvnr(PATIENT, "Z000000001"), version=4)  # the same change, a new version
    assert again.routed == [] and again.review == [] and len(again.held) == 1


def decode_held(s):
    from pipeline.records import NormalizedResource, decode

    return [decode(bytes.fromhex(item), NormalizedResource) for item in s.held[LOCAL]]


def test_accepted_change_sends_the_held_records_to_the_patient_now_named(config) -> None:
    s, _, _ = under_review(config)
    out = decide(config, s, "accept")
    assert [(r.resource_type, r.patient_key) for r in out.routed] == [("Patient", OTHER_KEY), ("Encounter", OTHER_KEY)]
    assert orjson.loads(out.routed[0].resource)["id"] == OTHER_KEY
    assert out.released == 2 and LOCAL not in s.held and _no_lsn(s.keys[LOCAL]) == {"key": OTHER_KEY, "reviews": 1}
    assert out.closed["action"] == "accepted" and out.closed["previous_key"] == KEY
    assert out.closed["key"] == OTHER_KEY and out.closed["by"] == "dr-review"
    [later] = routed(config, s, {**ENCOUNTER, "id": "enc-later"})
    assert later.patient_key == OTHER_KEY


def test_accepting_asks_for_the_records_sent_before_the_change_to_move_to_the_patient_now_named(config) -> None:
    from pipeline.patientmove import moved_to

    s, _, _ = under_review(config)
    out = decide(config, s, "accept")
    targets = sorted({r.target for r in config.sites["site-a"].routes})
    assert [m.target for m in out.moves] == targets  # one per target the site's Patients go to
    for move in out.moves:
        # Keyed by the Patient it moves from: in that Patient's partition, the order stage takes the site out of it.
        assert (move.op, move.resource_type, move.target_id, move.patient_key) == ("MOVE", "Patient", KEY, KEY)
        assert (move.site, move.source_id, moved_to(move)) == ("site-a", PATIENT["id"], OTHER_KEY)
        assert move.source_lsn is None  # not a position of the source row: never "newer" than a change of it


def test_a_route_that_sends_only_flagged_patients_gets_no_move(config) -> None:
    from pipeline.config import Route

    site = config.sites["site-a"]
    flagged = site.model_copy(update={"routes": [Route(target="central", trigger="tumorboard-flag")]})
    s, _, _ = under_review(config)
    record = normalized(config, with_kvnr(PATIENT, "Z000000001"), op="u", version=2)
    decision = IdentityDecision("accept", 1, KEY, OTHER_KEY, "dr-review", "checked", 1)
    out = apply_decision(s, record, flagged, decision)
    assert out.closed["action"] == "accepted" and out.moves == []


@pytest.mark.parametrize("how", ["reject", "withdrawn", "accept a lost identifier"])
def test_only_accepting_a_new_identifier_moves_earlier_records(config, how) -> None:
    s, _, _ = under_review(config)
    if how == "reject":
        out = decide(config, s, "reject")
    elif how == "withdrawn":
        out = resolve(config, s, PATIENT, version=4)
    else:
        s = state()
        routed(config, s, PATIENT)
        resolve(config, s, with_kvnr(PATIENT, None))
        out = decide(config, s, "accept", proposed=None, patient=with_kvnr(PATIENT, None))
    assert out.closed is not None and out.moves == []


def test_rejected_change_keeps_the_patient_and_never_applies_the_identifier_it_named(config) -> None:
    s, _, _ = under_review(config)
    out = decide(config, s, "reject")
    assert [(r.resource_type, r.patient_key) for r in out.routed] == [("Encounter", KEY)]
    assert [r.resource_type for r, _ in out.not_applied] == ["Patient"] and out.review == []
    assert out.closed["action"] == "rejected" and out.closed["key"] == KEY
    again = resolve(config, s, with_kvnr(PATIENT, "Z000000001"), version=5)  # the hospital has not fixed it yet
    assert again.routed == [] and again.review == [] and "rejected" in again.not_applied[0][1]
    fixed = resolve(config, s, PATIENT, version=6)
    assert [r.patient_key for r in fixed.routed] == [KEY] and _no_lsn(s.keys[LOCAL]) == {"key": KEY, "reviews": 1}


def test_a_third_identifier_after_a_rejection_is_a_new_review(config) -> None:
    s, _, _ = under_review(config)
    decide(config, s, "reject")
    out = resolve(config, s, with_kvnr(PATIENT, "Y000000002"), version=5)
    assert out.routed == [] and len(out.review) == 1
    assert s.keys[LOCAL]["review"] == {"proposed": global_patient_key(KVNR, "Y000000002"), "number": 2}


def test_hospital_taking_the_change_back_closes_the_review_and_releases_under_the_old_patient(config) -> None:
    s, _, _ = under_review(config)
    out = resolve(config, s, PATIENT, version=4)
    assert [(r.resource_type, r.patient_key) for r in out.routed] == [("Encounter", KEY), ("Patient", KEY)]
    assert out.closed["action"] == "withdrawn" and out.closed["by"] == "site-a"
    assert _no_lsn(s.keys[LOCAL]) == {"key": KEY, "reviews": 1} and LOCAL not in s.held


def test_a_decision_on_a_proposal_the_hospital_changed_since_is_refused(config) -> None:
    s, _, _ = under_review(config)
    third = global_patient_key(KVNR, "Y000000002")
    resolve(config, s, with_kvnr(PATIENT, "Y000000002"), version=4)
    with pytest.raises(IdentityDecisionError, match=f"is now review 2, patient key {KEY} -> {third}"):
        decide(config, s, "accept")
    assert s.keys[LOCAL]["review"] == {"proposed": third, "number": 2} and len(s.held[LOCAL]) == 3


def test_a_decision_on_an_earlier_review_with_the_same_keys_is_refused(config) -> None:
    s, _, _ = under_review(config)  # review 1: KEY -> OTHER_KEY, seen by the reviewer
    resolve(config, s, PATIENT, version=4)  # the hospital takes it back (withdrawn) ...
    resolve(config, s, with_kvnr(PATIENT, "Z000000001"), version=5)  # ... and makes the same change again
    record = normalized(config, with_kvnr(PATIENT, "Z000000001"), op="u", version=2)
    seen = IdentityDecision("accept", 1, KEY, OTHER_KEY, "dr-review", "checked", 1)
    with pytest.raises(IdentityDecisionError, match="is now review 2"):
        apply_decision(s, record, config.sites["site-a"], seen)
    assert s.keys[LOCAL]["review"] == {"proposed": OTHER_KEY, "number": 2}


def test_a_decision_without_an_open_review_is_refused(config) -> None:
    s = state()
    routed(config, s, PATIENT)
    with pytest.raises(IdentityDecisionError, match="no identity review is open"):
        decide(config, s, "accept")


def test_accepting_a_lost_identifier_holds_the_patient_until_it_has_one_again(config) -> None:
    s = state()
    routed(config, s, PATIENT)
    resolve(config, s, with_kvnr(PATIENT, None))
    resolve(config, s, ENCOUNTER, op="c", version=3)
    out = decide(config, s, "accept", proposed=None, patient=with_kvnr(PATIENT, None))
    assert out.routed == [] and "key" not in s.keys[LOCAL]
    assert [reason for _, reason in out.held] == [
        f"Patient has no {KVNR} identifier",
        "patient has no shared identifier yet",
    ]
    found = resolve(config, s, with_kvnr(PATIENT, "Z000000001"), version=4)
    assert [(r.resource_type, r.patient_key) for r in found.routed] == [
        ("Patient", OTHER_KEY),
        ("Encounter", OTHER_KEY),
    ]


THIRD_KEY = global_patient_key(KVNR, "Y000000002")


@pytest.mark.parametrize(
    ("numbers", "action", "key_after", "observation_to"),
    [
        # accepting the newest change (no number) must not let an older held version (Z...) name the patient
        (["Z000000001", None], "accept", None, None),
        # rejecting a lost number: the patient stays K, and versions without the number are not applied
        ([None], "reject", KEY, KEY),
        # rejecting the newest proposal must not re-open the review on an older held version
        (["Z000000001", "Y000000002"], "reject", KEY, KEY),
        (["Z000000001", "Y000000002", "Z000000001"], "reject", KEY, KEY),
        # accepting the newest proposal must not open a review of the older held version against it
        (["Z000000001", "Y000000002"], "accept", THIRD_KEY, THIRD_KEY),
    ],
)
def test_a_decision_takes_the_newest_held_patient_version_and_closes_the_review_for_good(
    config, numbers, action, key_after, observation_to
) -> None:
    s = state()
    routed(config, s, PATIENT)
    resolve(config, s, with_kvnr(PATIENT, numbers[0]), version=2)
    resolve(config, s, ENCOUNTER, op="c", version=3)
    for n, number in enumerate(numbers[1:], start=4):
        resolve(config, s, with_kvnr(PATIENT, number), version=n)
    proposed = s.keys[LOCAL]["review"]["proposed"]
    out = decide(config, s, action, proposed=proposed, patient=with_kvnr(PATIENT, numbers[-1]))
    assert out.review == [] and "review" not in s.keys[LOCAL] and s.keys[LOCAL].get("key") == key_after
    assert [r.patient_key for r in out.routed if r.resource_type == "Encounter"] == (
        [observation_to] if observation_to else []
    )
    superseded = [r.source_version for r, _ in out.not_applied if r.resource_type == "Patient"]
    assert len(superseded) == len(numbers) - (0 if action == "reject" else 1)
    if action == "reject":
        again = resolve(config, s, with_kvnr(PATIENT, numbers[-1]), version=9)  # the hospital has not fixed it yet
        assert again.routed == [] and again.review == [] and len(again.not_applied) == 1


def test_decision_header_round_trips_and_a_malformed_one_is_a_clear_error() -> None:
    decision = IdentityDecision("reject", 3, KEY, None, "dr-review", "typo at registration", 1)
    assert parse_decision([("other", b"x"), (DECISION_HEADER, decision.header())]) == decision
    assert parse_decision([("other", b"x")]) is None
    with pytest.raises(EnvelopeError, match=DECISION_HEADER):
        parse_decision(
            [(DECISION_HEADER, b'{"action": "merge", "proposed": "-", "by": "x", "reason": "", "at_ms": 1}')]
        )
    with pytest.raises(EnvelopeError, match=DECISION_HEADER):
        parse_decision([(DECISION_HEADER, b"accept")])


def test_delete_is_routed_to_the_same_id_without_body(config) -> None:
    s = state()
    routed(config, s, PATIENT)
    encounter = first_of("ADT-A01-01", "Encounter")
    [created] = routed(config, s, encounter)
    [deleted] = routed(config, s, encounter, op="d")
    assert deleted.target_id == created.target_id and deleted.patient_key == created.patient_key
    assert deleted.resource is None and deleted.is_delete


# Property: whatever the order of a patient's records and of the Patient's versions (with and
# without the shared identifier), nothing is routed before the Patient has its identifier, nothing
# is lost, and the records keep their arrival order.
@settings(max_examples=200)
@given(st.lists(st.booleans(), min_size=1, max_size=4), st.integers(0, 5), st.randoms(use_true_random=False))
def test_held_records_are_released_once_in_order(config, patient_versions, observations, rnd) -> None:
    s = state()
    events = [("Patient", v, has_id) for v, has_id in enumerate(patient_versions, 1)]
    events += [("Observation", n, None) for n in range(observations)]
    rnd.shuffle(events)
    events.append(("Patient", len(patient_versions) + 1, True))  # the identifier arrives in the end
    routed_out, keyed = [], False
    for kind, n, has_id in events:
        if kind == "Patient":
            resource = with_kvnr(PATIENT, "A123456789" if has_id else None)
            record = normalized(config, resource, op="u", version=n)
        else:
            resource = {
                "resourceType": "Observation",
                "id": f"obs-{n}",
                "status": "final",
                "code": {"text": "x"},
                "subject": {"reference": f"Patient/{PATIENT['id']}"},
            }
            record = normalized(config, resource)
        out = resolve_identity(s, record, config.sites["site-a"])
        for item in out.routed:
            keyed = keyed or item.resource_type == "Patient"
            assert keyed, "a record was routed before its patient had the shared identifier"
        routed_out += out.routed
    observed = [r.source_id for r in routed_out if r.resource_type == "Observation"]
    arrival = [f"obs-{n}" for kind, n, _ in events if kind == "Observation"]
    assert observed == arrival
    assert s.held == {}


def merged_record(kvnr: str | None, survivor: str = "survivor-1", own: str | None = "A123456789") -> dict:
    """PATIENT's record as a hospital merge leaves it: replaced by the survivor, under the survivor's number (and
    its own earlier one, `old`)."""
    current = [{"system": KVNR, "value": kvnr}] if kvnr else []
    return {
        "resourceType": "Patient",
        "id": PATIENT["id"],
        "active": False,
        "identifier": current + ([{"system": KVNR, "value": own, "use": "old"}] if own else []),
        "link": [{"other": {"reference": f"Patient/{survivor}"}, "type": "replaced-by"}],
    }


def test_a_merged_record_under_the_same_number_is_not_applied_and_nothing_moves(config) -> None:
    s = state()
    routed(config, s, PATIENT)
    out = resolve(config, s, merged_record("A123456789"))
    assert out.routed == [] and out.review == [] and out.moves == []
    assert [why for _, why in out.not_applied] == [f"{LOCAL} was merged into site-a|survivor-1 at the hospital"]
    assert _no_lsn(s.keys[LOCAL]) == {"key": KEY}
    [later] = routed(config, s, {**ENCOUNTER, "id": "enc-after-merge"})
    assert later.patient_key == KEY


def test_a_merge_into_another_person_s_number_is_an_identity_review_and_accepting_moves_to_the_survivor(
    config,
) -> None:
    s = state()
    routed(config, s, PATIENT)
    out = resolve(config, s, merged_record("Z000000001"))  # its own number A123456789 is `old`: not where it goes
    [review] = out.review
    assert review.reason == f"{LOCAL} was merged into site-a|survivor-1: patient key {KEY} -> {OTHER_KEY}"
    resolve(config, s, ENCOUNTER, op="c", version=3)  # held while under review
    decided = decide(config, s, "accept", patient=merged_record("Z000000001"))
    # The merged record's Patient is not written anywhere (the survivor's is the central one); its records go on.
    assert [(r.resource_type, r.patient_key) for r in decided.routed] == [("Encounter", OTHER_KEY)]
    assert s.keys[LOCAL]["key"] == OTHER_KEY
    [move] = decided.moves
    assert orjson.loads(move.resource) == {"to": OTHER_KEY, "holder": "survivor-1"}  # the Patient now names it


def test_a_merge_that_names_no_shared_identifier_is_an_error_naming_both_records(config) -> None:
    from pipeline.identity import IdentityMergeError

    s = state()
    routed(config, s, PATIENT)
    with pytest.raises(IdentityMergeError, match=f"{LOCAL} was merged into site-a|survivor-1 .* names no {KVNR}"):
        resolve(config, s, merged_record(None))
    assert _no_lsn(s.keys[LOCAL]) == {"key": KEY}


def test_a_merged_record_never_sent_for_want_of_a_number_releases_what_waited_to_the_survivor(config) -> None:
    s = state()
    resolve(config, s, with_kvnr(PATIENT, None), op="c", version=1)  # held: no insurance number yet
    resolve(config, s, ENCOUNTER, op="c", version=2)
    out = resolve(config, s, merged_record("Z000000001", own="X000000009"), version=3)
    assert [(r.resource_type, r.patient_key) for r in out.routed] == [("Encounter", OTHER_KEY)]
    assert out.review == [] and _no_lsn(s.keys[LOCAL]) == {"key": OTHER_KEY} and LOCAL not in s.held


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        # FHIR $merge leaves the merged record's own identifiers as they were: its number may be its own.
        ({**merged_record("Z000000001"), "identifier": [{"system": KVNR, "value": "Z000000001"}]}, "does not mark"),
        (merged_record("Z000000001") | {"id": "never-sent"}, "never received site-a|never-sent"),
    ],
)
def test_a_merge_that_cannot_say_where_the_patient_is_now_is_an_error(config, record, reason) -> None:
    from pipeline.identity import IdentityMergeError

    s = state()
    routed(config, s, PATIENT)
    with pytest.raises(IdentityMergeError, match=reason):
        resolve(config, s, record)


def test_a_merge_while_a_change_of_the_same_number_is_under_review_moves_to_the_survivor(config) -> None:
    s, _, _ = under_review(config)  # KEY -> OTHER_KEY, review 1
    held = resolve(config, s, merged_record("Z000000001"), version=4)  # then merged into the survivor: same proposal
    assert held.review == [] and len(s.held[LOCAL]) == 3
    out = decide(config, s, "accept")
    # The merged version is the one taken (the newest): the Patient now named holds the survivor, not this record.
    assert out.closed["holder"] == "survivor-1"
    assert [orjson.loads(m.resource)["holder"] for m in out.moves] == ["survivor-1"]
    assert [r.resource_type for r in out.routed] == ["Encounter"]


def test_a_merge_into_a_number_a_reviewer_once_rejected_is_a_new_review(config) -> None:
    s, _, _ = under_review(config)
    decide(config, s, "reject")  # it stayed KEY; Z000000001 was a typo then
    out = resolve(config, s, merged_record("Z000000001"), version=5)  # now the hospital merges it into that person
    assert len(out.review) == 1 and "was merged into site-a|survivor-1" in out.review[0].reason


def test_an_older_patient_version_read_again_does_not_withdraw_an_open_review(config) -> None:  # type: ignore[no-untyped-def]
    """A batch processed twice after a restart brings the hospital's earlier Patient version again, after the one
    that opened a review. Taken for the hospital going back, it would withdraw the review and send the held records
    to the old patient; it is an old version, and is not applied."""
    s, site = state(), config.sites["site-a"]
    position = SourcePosition("cdc.site-a.fhir.resource", 0, 7)

    def version(resource: dict, op: str, lsn: int):  # type: ignore[no-untyped-def]
        return normalize_change(site, debezium_value(op, None, row(resource, 1), lsn=lsn), position)

    resolve_identity(s, version(PATIENT, "c", 100), site)
    resolve_identity(s, version(with_kvnr(PATIENT, "Z000000001"), "u", 200), site)
    assert s.keys[LOCAL]["review"]["proposed"] == OTHER_KEY
    out = resolve_identity(s, version(PATIENT, "c", 100), site)  # read again
    assert out.closed is None and s.keys[LOCAL]["review"]["proposed"] == OTHER_KEY
    assert [why for _, why in out.not_applied] == [
        f"an older version of {LOCAL} (source LSN 100) read again after LSN 200"
    ]
    taken_back = resolve_identity(s, version(PATIENT, "u", 300), site)  # the hospital takes the change back
    assert taken_back.closed is not None and "review" not in s.keys[LOCAL]


def test_a_patient_version_from_another_source_row_is_never_compared_by_lsn(config) -> None:  # type: ignore[no-untyped-def]
    """HL7 v2 messages are rows of their own: the message committed second can carry the lower LSN. Its Patient
    (here a changed insurance number) is applied as it comes, so the review opens."""
    s, site = state(), config.sites["site-a"]
    position = SourcePosition("cdc.site-a.fhir.resource", 0, 7)
    first = normalize_change(site, debezium_value("c", None, row(PATIENT, 1), lsn=310), position)
    resolve_identity(s, first, site)
    changed = normalize_change(
        site, debezium_value("u", None, row(with_kvnr(PATIENT, "Z000000001"), 2), lsn=300), position
    )
    out = resolve_identity(s, replace(changed, source_id="adt-message-2"), site)
    assert out.not_applied == [] and s.keys[LOCAL]["review"]["proposed"] == OTHER_KEY
