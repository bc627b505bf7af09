"""The clinically meaningful view of a FHIR resource, for round-trip comparisons.

Everything in the resource counts except its identity (id, meta, identifier, narrative, the patient and
encounter references: the composition carries those), coding displays (openEHR keeps one text per
concept), a UCUM quantity's display unit (its code says the same), and Observation.category (derived
from the code on both sides). Date-times compare as instants.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

IDENTITY = {"id", "meta", "identifier", "text", "subject", "patient", "encounter"}
UCUM = "http://unitsofmeasure.org"


ENCOUNTER_DIAGNOSIS = [
    {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "encounter-diagnosis"}]}
]


def clinical_view(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource without identity and presentation, normalised for comparison.

    A Condition without category is an encounter diagnosis on the way back (it is written into an event
    composition), so that is its view. A value concept that is only text is free text, as a string is.
    A verification status compares on its FHIR code: the openEHR certainty (suspected/probable) that rides
    along as a second coding is checked at the openEHR level (test_openehr_roundtrip).
    """
    view = {k: _norm(v) for k, v in resource.items() if k not in IDENTITY}
    if resource.get("resourceType") == "Observation":
        view.pop("category", None)
    concept = view.get("valueCodeableConcept")
    if isinstance(concept, dict) and set(concept) == {"text"}:  # free text either way (openEHR DV_TEXT)
        view["valueString"] = view.pop("valueCodeableConcept")["text"]
    status = view.get("verificationStatus")
    if isinstance(status, dict):  # the archetype's own certainty code rides along; FHIR's code is the status
        status["coding"] = [c for c in status["coding"] if not c.get("system", "").startswith("urn:openehr:archetype:")]
    if resource.get("resourceType") == "Condition" and "category" not in view:
        view["category"] = _norm(ENCOUNTER_DIAGNOSIS)
    return view


def _norm(node: Any) -> Any:
    if isinstance(node, list):
        return [_norm(item) for item in node]
    if isinstance(node, dict):
        out = {k: _norm(v) for k, v in node.items()}
        if "coding" in out:
            # A concept's text is its text, else its first coding's display: openEHR keeps exactly that one.
            text = out.get("text") or next((c["display"] for c in out["coding"] if c.get("display")), None)
            if text:
                out["text"] = text
            out["coding"] = sorted(
                ({k: v for k, v in c.items() if k != "display"} for c in out["coding"]),
                key=lambda c: (c.get("system", ""), c.get("code", "")),
            )
        if out.get("system") == UCUM and "code" in out:
            out.pop("unit", None)
        return out
    if isinstance(node, str) and len(node) > 10 and node[4:5] == "-" and "T" in node:
        try:
            return datetime.fromisoformat(node).timestamp()
        except ValueError:
            return node
    return node
