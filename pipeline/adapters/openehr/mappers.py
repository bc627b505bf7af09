"""Which mapper handles which archetype: the openEHR adapter's rule table."""

from __future__ import annotations

from . import clinical, entries, rules
from .entries import EntryMapper

__all__ = ["CONTEXT_CLUSTERS", "ENTRY_MAPPERS"]

ENTRY_MAPPERS: dict[str, EntryMapper] = {
    **{archetype: entries.vital_signs_to_observation for archetype in rules.VITAL_SIGNS},
    "openEHR-EHR-OBSERVATION.laboratory_test_result.v1": entries.laboratory_test_result_to_report,
    "openEHR-EHR-OBSERVATION.lab_test-result.v1": entries.lab_test_result_to_report,
    "openEHR-EHR-EVALUATION.problem_diagnosis.v1": clinical.problem_diagnosis_to_condition,
    "openEHR-EHR-EVALUATION.adverse_reaction_risk.v1": clinical.adverse_reaction_risk_to_allergy,
    "openEHR-EHR-ACTION.procedure.v1": clinical.procedure_to_procedure,
    "openEHR-EHR-INSTRUCTION.service_request.v1": clinical.service_request_to_service_request,
    "openEHR-EHR-INSTRUCTION.medication_order.v3": clinical.medication_order_to_medication_request,
    "openEHR-EHR-ADMIN_ENTRY.document_attachment.v0": clinical.document_attachment_to_document_reference,
}

# Archetyped clusters in COMPOSITION.context.other_context → (identifier system, at-code of the id) on the Encounter.
CONTEXT_CLUSTERS: dict[str, tuple[str, str]] = {
    "openEHR-EHR-CLUSTER.case_identification.v0": ("urn:cdrsync:openehr:case-id", "at0001"),
}
