"""FHIR R4 resource types cdrsync syncs, their validation, and how they point at a patient.

fhir.resources 8.x ships R5 (default) and R4B models but no R4. We validate with R4B: for the
resource types synced here R4B is wire-compatible with R4 (R4B's changes are in medication
definition, evidence and subscription resources), so a document valid under R4B is valid R4.
Validation only checks; the JSON we forward is the source's, never a re-serialised model.
"""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError

from .errors import MappingError
from .references import relative_reference

__all__ = [
    "DEPENDENCY_RANK",
    "SUPPORTED_TYPES",
    "dependency_rank",
    "is_fhir_type",
    "patient_reference",
    "validate_resource",
]

# The case study's 13 types plus the tumour-board decision flowing back.
SUPPORTED_TYPES = frozenset(
    {
        "Patient",
        "Encounter",
        "Coverage",
        "Flag",
        "Condition",
        "Observation",
        "DiagnosticReport",
        "Procedure",
        "MedicationRequest",
        "AllergyIntolerance",
        "CarePlan",
        "ServiceRequest",
        "DocumentReference",
        "QuestionnaireResponse",
    }
)

# Patient → Encounter, Coverage → everything else. A reference to a lower rank is a hard dependency
# (the resource waits for it); ranks strictly decrease along hard dependencies, so they cannot cycle.
DEPENDENCY_RANK = {"Patient": 0, "Encounter": 1, "Coverage": 1}
_OTHER_RANK = 2


def dependency_rank(resource_type: str) -> int:
    """Rank of a type in write order: Patient 0, Encounter and Coverage 1, every other type 2."""
    return DEPENDENCY_RANK.get(resource_type, _OTHER_RANK)


# Where each type names its patient (FHIR R4 element names).
_PATIENT_ELEMENTS = {
    "Encounter": ("subject",),
    "Coverage": ("beneficiary",),
    "Flag": ("subject",),
    "Condition": ("subject",),
    "Observation": ("subject",),
    "DiagnosticReport": ("subject",),
    "Procedure": ("subject",),
    "MedicationRequest": ("subject",),
    "AllergyIntolerance": ("patient",),
    "CarePlan": ("subject",),
    "ServiceRequest": ("subject",),
    "DocumentReference": ("subject",),
    "QuestionnaireResponse": ("subject",),
}


def is_fhir_type(name: str) -> bool:
    """True for the name of a FHIR resource type (whether or not cdrsync carries it)."""
    try:
        model = get_fhir_model_class(name)
    except (KeyError, ValueError, AttributeError, ImportError):
        return False
    return issubclass(model, Resource) and model.get_resource_type() == name


def validate_resource(resource: dict[str, Any]) -> None:
    """Raise MappingError unless the resource is a valid FHIR R4 resource of a supported type."""
    resource_type = resource.get("resourceType")
    if resource_type not in SUPPORTED_TYPES:
        raise MappingError(f"unsupported resource type {resource_type!r}")
    try:
        get_fhir_model_class(resource_type).model_validate(resource)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or resource_type}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise MappingError(f"invalid FHIR R4 {resource_type}: {problems}") from None


def patient_part(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource reduced to what names its patient (its type, id and patient element): enough for
    `patient_reference`, without its clinical content."""
    kept = ("resourceType", "id", *_PATIENT_ELEMENTS.get(str(resource.get("resourceType")), ()))
    return {key: resource[key] for key in kept if key in resource}


def patient_reference(resource: dict[str, Any]) -> str | None:
    """The literal reference to the resource's patient ("Patient/<id>", a version suffix left out), itself
    for a Patient; None for a resource that names no patient (its element absent, or naming a Group, a
    Device, a Location).

    A patient named in a way identity resolution cannot follow (an absolute URL, a contained Patient, an
    identifier alone) raises MappingError: written as it is, the resource would hang off no central Patient.
    """
    resource_type = resource.get("resourceType")
    if resource_type == "Patient":
        return f"Patient/{resource.get('id')}"
    for element in _PATIENT_ELEMENTS.get(str(resource_type), ()):
        value = resource.get(element)
        if not isinstance(value, dict):
            continue
        reference = value.get("reference")
        if isinstance(reference, str):
            parsed = relative_reference(reference)
            if parsed is not None and parsed[0] == "Patient":
                return f"Patient/{parsed[1]}"
            if reference.startswith(("#", "urn:")) or "Patient/" in reference:
                raise MappingError(
                    f"{resource_type}.{element} names its patient as {_reference_kind(reference)}; "
                    "cdrsync follows only a relative reference (Patient/<id>) to the hospital's own Patient"
                )
        elif value.get("type") == "Patient" or (value.get("identifier") and value.get("type") in (None, "Patient")):
            raise MappingError(
                f"{resource_type}.{element} names its patient by identifier only; cdrsync follows only a "
                "relative reference (Patient/<id>) to the hospital's own Patient"
            )
    return None


def _reference_kind(reference: str) -> str:
    if reference.startswith("#"):
        return "a contained resource"
    if "://" in reference or reference.startswith("urn:"):
        return "an absolute URL"
    return "a reference it cannot read"
