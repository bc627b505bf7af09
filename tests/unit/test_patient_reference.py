"""Which patient a resource belongs to (pipeline/resources.py patient_reference): identity resolution follows it
to the central Patient, so a patient it cannot follow must stop the record with the reason, never let it
through attached to no one, or held for a patient that can never arrive."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.errors import MappingError
from pipeline.resources import patient_reference

pytestmark = pytest.mark.unit


def _observation(subject: dict[str, Any] | None) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": "o1", **({"subject": subject} if subject is not None else {})}


def test_a_relative_reference_names_the_patient_and_a_version_suffix_is_left_out() -> None:
    assert patient_reference(_observation({"reference": "Patient/123"})) == "Patient/123"
    # Held as "site|123/_history/2" before: a key no Patient ever releases.
    assert patient_reference(_observation({"reference": "Patient/123/_history/2"})) == "Patient/123"
    assert patient_reference({"resourceType": "Patient", "id": "123"}) == "Patient/123"
    assert patient_reference({"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/9"}}) == (
        "Patient/9"
    )


def test_a_resource_about_no_patient_names_none() -> None:
    assert patient_reference(_observation(None)) is None
    assert patient_reference(_observation({"reference": "Group/g1"})) is None
    assert patient_reference(_observation({"reference": "Device/d1", "type": "Device"})) is None
    assert patient_reference(_observation({"identifier": {"value": "x"}, "type": "Device"})) is None


@pytest.mark.parametrize(
    ("subject", "says"),
    [
        ({"reference": "https://fhir.hospital.example/r4/Patient/123"}, "an absolute URL"),
        ({"reference": "#p1"}, "a contained resource"),
        ({"reference": "urn:uuid:3f1c6c1e-0000-4000-8000-000000000001"}, "an absolute URL"),
        ({"identifier": {"system": "urn:oid:1.2.3", "value": "4711"}}, "by identifier only"),
        ({"identifier": {"system": "urn:oid:1.2.3", "value": "4711"}, "type": "Patient"}, "by identifier only"),
    ],
)
def test_a_patient_identity_resolution_cannot_follow_is_a_mapping_error_with_the_reason(
    subject: dict[str, Any], says: str
) -> None:
    with pytest.raises(MappingError, match=says) as raised:
        patient_reference(_observation(subject))
    assert "Observation.subject" in str(raised.value) and "4711" not in str(raised.value)
