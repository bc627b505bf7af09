"""HL7 v2 code tables → FHIR codes, as data (after the HL7 v2-to-FHIR ConceptMaps)."""

from __future__ import annotations

V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

# Table 0001 administrative sex → AdministrativeGender.
GENDER = {"M": "male", "F": "female", "O": "other", "A": "other", "U": "unknown", "N": "unknown"}

# Table 0004 patient class → v3 ActCode encounter class.
ENCOUNTER_CLASS = {
    "I": ("IMP", "inpatient encounter"),
    "O": ("AMB", "ambulatory"),
    "E": ("EMER", "emergency"),
    "P": ("PRENC", "pre-admission"),
    "R": ("AMB", "ambulatory"),
    "B": ("IMP", "inpatient encounter"),
    "C": ("AMB", "ambulatory"),
}

# Table 0085 observation result status → Observation.status.
OBSERVATION_STATUS = {
    "C": "corrected",
    "D": "entered-in-error",
    "F": "final",
    "I": "registered",
    "N": "cancelled",
    "O": "registered",
    "P": "preliminary",
    "R": "preliminary",
    "S": "preliminary",
    "U": "final",
    "W": "entered-in-error",
    "X": "cancelled",
}

# Table 0123 result status (OBR-25) → DiagnosticReport.status.
REPORT_STATUS = {
    "O": "registered",
    "I": "registered",
    "S": "registered",
    "A": "partial",
    "P": "preliminary",
    "C": "corrected",
    "R": "partial",
    "F": "final",
    "X": "cancelled",
    "M": "partial",
}

# Table 0038 order status (ORC-5), then table 0119 control code (ORC-1) → request status.
ORDER_STATUS = {
    "A": "active",
    "CA": "revoked",
    "CM": "completed",
    "DC": "revoked",
    "ER": "entered-in-error",
    "HD": "on-hold",
    "IP": "active",
    "RP": "revoked",
    "SC": "active",
    "NW": "active",
    "OC": "revoked",
    "OD": "revoked",
    "XO": "active",
}

# Table 0078 abnormal flags → v3 ObservationInterpretation (same codes where both define them).
INTERPRETATION = frozenset({"L", "H", "LL", "HH", "N", "A", "AA", "S", "R", "I", "U", "D", "B", "W", "<", ">"})

# Table 0127 allergen type → AllergyIntolerance.category; table 0128 severity → reaction severity.
ALLERGY_CATEGORY = {"DA": "medication", "FA": "food", "EA": "environment", "MA": "medication", "PA": "environment"}
ALLERGY_SEVERITY = {"MI": "mild", "MO": "moderate", "SV": "severe"}

# Table 0271 document completion status (TXA-17) → DocumentReference.docStatus. Only an authenticated
# document is final; the table has no code for FHIR's "amended".
DOCUMENT_COMPLETION = {
    "AU": "final",
    "LA": "final",
    "DI": "preliminary",
    "DO": "preliminary",
    "IP": "preliminary",
    "IN": "preliminary",
    "PA": "preliminary",
}

# Table 0275 document availability status (TXA-19) → DocumentReference.status. UN (not released for
# patient care, may still be edited or cancelled) stays current but makes docStatus preliminary (orders.py).
DOCUMENT_AVAILABILITY = {
    "AV": "current",
    "UN": "current",
    "OB": "superseded",
    "CA": "entered-in-error",
}

# Table 0485 quantity timing priority (TQ1-9) → request priority.
PRIORITY = {"S": "stat", "A": "asap", "R": "routine", "P": "routine", "C": "urgent", "T": "urgent"}
