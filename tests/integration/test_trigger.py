"""site-b's route is `trigger: tumorboard-flag`: only what an active tumour-board Flag selects leaves it."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.identity import global_patient_key
from pipeline.ids import target_id
from pipeline.provenance import provenance_id
from tests.casebuilder import KVNR_SYSTEM, kvnr_of, observation_for, patient, tumorboard_flag
from tests.integration.conftest import Central, SiteDatabase, Worker, audit_rows, wait_for

pytestmark = pytest.mark.integration


def _encounter(encounter_id: str, patient_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": encounter_id,
        "status": "in-progress",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": {"reference": f"Patient/{patient_id}"},
    }


def _in_encounter(observation: dict[str, Any], encounter_id: str) -> dict[str, Any]:
    return {**observation, "encounter": {"reference": f"Encounter/{encounter_id}"}}


def _at_b(resource_type: str, source_id: str) -> str:
    return target_id("site-b", resource_type, source_id)


def _wait_held(source_id: str) -> None:
    """Wait until the order stage kept a record back for want of a flag (its audit row is the proof)."""
    wait_for(lambda: "trigger_held" in {row[0] for row in audit_rows(source_id)}, timeout=120, what=f"{source_id} held")


def test_tumorboard_flag_sends_its_encounter_with_earlier_observations_and_nothing_unflagged(
    worker: Worker, stack: Central, site_b: SiteDatabase, run_id: str
) -> None:
    flagged = patient(f"{run_id}-tb", 1)
    other = patient(f"{run_id}-tb", 2)
    encounter = _encounter(f"{run_id}-tb-enc", flagged["id"])
    earlier = [
        _in_encounter(observation_for(f"{run_id}-tb-e", flagged["id"], n, 60.0 + n), encounter["id"]) for n in (1, 2)
    ]
    other_encounter = _encounter(f"{run_id}-tb-enc2", other["id"])
    other_obs = _in_encounter(observation_for(f"{run_id}-tb-o", other["id"], 1, 90.0), other_encounter["id"])
    site_b.upsert_many([flagged, encounter, *earlier, other, other_encounter, other_obs])

    # Before any flag: every record is kept back at the order stage (audited as trigger_held), none at central.
    for source_id in [flagged["id"], encounter["id"], *(o["id"] for o in earlier)]:
        _wait_held(source_id)
    flagged_key = global_patient_key(KVNR_SYSTEM, kvnr_of(flagged["id"]))
    assert stack.read("Patient", flagged_key) is None
    assert stack.read("Encounter", _at_b("Encounter", encounter["id"])) is None

    flag = tumorboard_flag(f"{run_id}-tb-flag", flagged["id"], encounter["id"])
    site_b.upsert(flag)
    for resource_type, source_id in [("Encounter", encounter["id"]), *(("Observation", o["id"]) for o in earlier)]:
        body = wait_for(
            lambda t=resource_type, s=source_id: stack.read(t, _at_b(t, s)), timeout=120, what=f"backfilled {source_id}"
        )
        assert body["subject"]["reference"] == f"Patient/{flagged_key}"
    assert stack.read("Patient", flagged_key) is not None
    encounter_ref = f"Encounter/{_at_b('Encounter', encounter['id'])}"
    provenance = wait_for(
        lambda: stack.read("Provenance", provenance_id("site-b", encounter_ref)), timeout=120, what="its Provenance"
    )
    assert provenance["target"] == [{"reference": encounter_ref}]
    assert provenance["entity"][0]["what"]["identifier"]["value"] == encounter["id"]
    assert stack.read("Flag", _at_b("Flag", flag["id"]))["status"] == "active"
    wait_for(  # the audit store takes the events from the audit topic on its own time
        lambda: {row[0] for row in audit_rows(earlier[0]["id"])} >= {"trigger_held", "backfilled", "written"} or None,
        timeout=60,
        what="the backfilled observation's audit trail",
    )

    later = _in_encounter(observation_for(f"{run_id}-tb-l", flagged["id"], 3, 63.0), encounter["id"])
    site_b.upsert(later)  # a change after the flag follows it
    wait_for(lambda: stack.read("Observation", _at_b("Observation", later["id"])), timeout=120, what="the later one")

    # The unflagged patient: the order stage saw all of it (audited as held), and nothing reached central.
    for source_id in [other["id"], other_encounter["id"], other_obs["id"]]:
        _wait_held(source_id)
        assert not {"written", "backfilled"} & {row[0] for row in audit_rows(source_id)}
    assert stack.read("Patient", global_patient_key(KVNR_SYSTEM, kvnr_of(other["id"]))) is None
    assert stack.read("Encounter", _at_b("Encounter", other_encounter["id"])) is None
    assert stack.read("Observation", _at_b("Observation", other_obs["id"])) is None


def test_inactive_flag_stops_new_sends_what_was_sent_stays_and_reactivation_sends_what_waited(
    worker: Worker, stack: Central, site_b: SiteDatabase, run_id: str
) -> None:
    person = patient(f"{run_id}-tbi", 1)
    encounter = _encounter(f"{run_id}-tbi-enc", person["id"])
    flag = tumorboard_flag(f"{run_id}-tbi-flag", person["id"], encounter["id"])
    first = _in_encounter(observation_for(f"{run_id}-tbi", person["id"], 1, 70.0), encounter["id"])
    site_b.upsert_many([person, encounter, flag, first])
    wait_for(lambda: stack.read("Observation", _at_b("Observation", first["id"])), timeout=120, what="first obs")

    site_b.upsert({**flag, "status": "inactive"})
    wait_for(
        lambda: (stack.read("Flag", _at_b("Flag", flag["id"])) or {}).get("status") == "inactive",
        timeout=120,
        what="the withdrawn flag at central",
    )
    after = _in_encounter(observation_for(f"{run_id}-tbi", person["id"], 2, 71.0), encounter["id"])
    site_b.upsert(after)
    _wait_held(after["id"])
    assert stack.read("Observation", _at_b("Observation", after["id"])) is None
    assert stack.read("Observation", _at_b("Observation", first["id"])) is not None, "what was sent stays"

    # The board takes the case up again: the Flag active once more sends what waited while it was withdrawn.
    site_b.upsert({**flag, "status": "active"})
    body = wait_for(
        lambda: stack.read("Observation", _at_b("Observation", after["id"])), timeout=120, what="what waited"
    )
    assert body["valueQuantity"]["value"] == 71.0
    wait_for(
        lambda: (stack.read("Flag", _at_b("Flag", flag["id"])) or {}).get("status") == "active",
        timeout=120,
        what="the flag active again at central",
    )
