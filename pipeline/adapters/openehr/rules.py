"""Mapping rules that are data: archetype → FHIR code tables and at-code → FHIR status tables.

Every at-code below was read from the archetypes' term definitions in the operational templates under
../shared/data/openehr/templates/ (e.g. problem_qualifier.v1 at0026 'Active', at0027 'Inactive').
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ALLERGY_CRITICALITY",
    "ALLERGY_VERIFICATION",
    "ANALYTE_STATUS",
    "CONDITION_SEVERITY",
    "DIAGNOSTIC_CERTAINTY",
    "FREQUENCY_UNITS",
    "ISM_TO_PROCEDURE_STATUS",
    "LAB_OVERALL_STATUS",
    "REACTION_SEVERITY",
    "SERVICE_URGENCY",
    "SETTING_TO_CLASS",
    "VITAL_SIGNS",
    "VITAL_SIGN_BY_LOINC",
    "VitalSign",
]

LOINC = "http://loinc.org"


@dataclass(frozen=True)
class VitalSign:
    """One vital-signs archetype: the FHIR vital-signs profile code and where its value sits."""

    code: str
    display: str
    value_node: str  # at-code of the ELEMENT holding the measurement, inside each event's data
    units: str  # the UCUM units the archetype records, for the way back
    structure: tuple[str, str, str] = ("at0001", "at0002", "at0003")  # HISTORY, EVENT, ITEM_TREE node ids
    components: tuple[tuple[str, str, str], ...] = ()  # (at-code, LOINC code, display) for panels


# FHIR R4 vital-signs profile (http://hl7.org/fhir/R4/observation-vitalsigns.html) LOINC codes.
VITAL_SIGNS: dict[str, VitalSign] = {
    "openEHR-EHR-OBSERVATION.body_temperature.v2": VitalSign(
        "8310-5", "Body temperature", "at0004", "Cel", ("at0002", "at0003", "at0001")
    ),
    "openEHR-EHR-OBSERVATION.body_temperature-zn.v1": VitalSign(
        "8310-5", "Body temperature", "at0004", "Cel", ("at0002", "at0003", "at0001")
    ),
    "openEHR-EHR-OBSERVATION.pulse.v2": VitalSign(
        "8867-4", "Heart rate", "at0004", "/min", ("at0002", "at0003", "at0001")
    ),
    "openEHR-EHR-OBSERVATION.respiration.v2": VitalSign("9279-1", "Respiratory rate", "at0004", "/min"),
    "openEHR-EHR-OBSERVATION.body_weight.v2": VitalSign(
        "29463-7", "Body weight", "at0004", "kg", ("at0002", "at0003", "at0001")
    ),
    "openEHR-EHR-OBSERVATION.height.v2": VitalSign("8302-2", "Body height", "at0004", "cm"),
    "openEHR-EHR-OBSERVATION.head_circumference.v1": VitalSign(
        "9843-4", "Head Occipital-frontal circumference", "at0004", "cm", ("at0001", "at0010", "at0003")
    ),
    "openEHR-EHR-OBSERVATION.pulse_oximetry.v1": VitalSign(
        "2708-6", "Oxygen saturation in Arterial blood", "at0006", "%"
    ),
    "openEHR-EHR-OBSERVATION.body_mass_index.v2": VitalSign(
        "39156-5", "Body mass index (BMI) [Ratio]", "at0004", "kg/m2"
    ),
    "openEHR-EHR-OBSERVATION.blood_pressure.v2": VitalSign(
        "85354-9",
        "Blood pressure panel with all children optional",
        "",
        "mm[Hg]",
        ("at0001", "at0006", "at0003"),
        (("at0004", "8480-6", "Systolic blood pressure"), ("at0005", "8462-4", "Diastolic blood pressure")),
    ),
}
# The way back (FHIR → openEHR): each vital-signs LOINC code to the archetype that records it.
# body_temperature-zn.v1 is a local specialisation: the international archetype is the one written.
# Pulse oximetry is chosen by 59408-5 (SpO2 by pulse oximetry) only: a bare 2708-6 may be a blood-gas
# SaO2, which is a laboratory result, not this archetype's measurement.
VITAL_SIGN_BY_LOINC = {
    ("59408-5" if rule.code == "2708-6" else rule.code): archetype
    for archetype, rule in reversed(list(VITAL_SIGNS.items()))
    if "-zn." not in archetype
}

# openEHR instruction state machine (openehr terminology, group "instruction states") → Procedure.status.
ISM_TO_PROCEDURE_STATUS = {
    "524": "preparation",  # initial
    "526": "preparation",  # planned
    "529": "preparation",  # scheduled
    "527": "on-hold",  # postponed
    "530": "on-hold",  # suspended
    "245": "in-progress",  # active
    "532": "completed",  # completed
    "531": "stopped",  # aborted
    "528": "not-done",  # cancelled
    "533": "not-done",  # expired (never carried out)
}
# States in which the procedure has (at least partly) been performed: ACTION.time is then when.
PERFORMED_STATES = frozenset({"245", "530", "531", "532"})

# COMPOSITION context setting (openehr terminology, group "setting") → Encounter.class (v3 ActCode).
SETTING_TO_CLASS = {
    "225": ("HH", "home health"),
    "227": ("EMER", "emergency"),
    "228": ("AMB", "ambulatory"),
    "229": ("AMB", "ambulatory"),
    "230": ("AMB", "ambulatory"),
    "231": ("AMB", "ambulatory"),
    "232": ("AMB", "ambulatory"),
    "233": ("AMB", "ambulatory"),
    "234": ("AMB", "ambulatory"),
    "235": ("AMB", "ambulatory"),
    "236": ("AMB", "ambulatory"),
    "237": ("NONAC", "inpatient non-acute"),
}

# problem_diagnosis.v1 at0073 Diagnostic certainty → Condition.verificationStatus.
DIAGNOSTIC_CERTAINTY = {"at0074": "provisional", "at0075": "provisional", "at0076": "confirmed"}
# problem_diagnosis.v1 at0005 Severity → SNOMED CT (the FHIR condition-severity value set).
CONDITION_SEVERITY = {
    "at0047": ("255604002", "Mild"),
    "at0048": ("6736007", "Moderate"),
    "at0049": ("24484000", "Severe"),
}
# adverse_reaction_risk.v1 at0063 Status → AllergyIntolerance.verificationStatus (Resolved → clinical status).
ALLERGY_VERIFICATION = {
    "at0127": "unconfirmed",
    "at0064": "unconfirmed",
    "at0065": "confirmed",
    "at0067": "confirmed",
    "at0066": "refuted",
}
ALLERGY_CRITICALITY = {"at0102": "low", "at0103": "high", "at0124": "unable-to-assess"}
REACTION_SEVERITY = {"at0093": "mild", "at0092": "moderate", "at0090": "severe"}

# laboratory_test_analyte.v1 at0005 Result status → Observation.status.
ANALYTE_STATUS = {
    "at0015": "registered",
    "at0016": "preliminary",  # partial
    "at0017": "preliminary",
    "at0018": "final",
    "at0019": "corrected",
    "at0020": "amended",
    "at0021": "amended",  # appended
    # 'Entered in error' / 'Endbefund, widerrufen': "withdrawn following previous Final release", which is
    # FHIR's definition of entered-in-error (cancelled = never started or not completed, at0023).
    "at0022": "entered-in-error",
    "at0023": "cancelled",
}
# laboratory_test_result.v1 at0073 Overall test status → DiagnosticReport.status (all seven codes of the shared
# templates; lab_test-result.v1 is read with the same table: its codes of the first four agree).
LAB_OVERALL_STATUS = {
    "at0107": "registered",
    "at0037": "partial",
    "at0038": "final",
    "at0040": "amended",
    "at0115": "corrected",
    "at0116": "entered-in-error",  # withdrawn following previous Final release
    "at0074": "cancelled",  # not started or not completed
}
# The Observation status for each report status, when an analyte has no status of its own.
REPORT_TO_OBSERVATION_STATUS = {
    "registered": "registered",
    "partial": "preliminary",
    "final": "final",
    "amended": "amended",
    "corrected": "corrected",
    "entered-in-error": "entered-in-error",
    "cancelled": "cancelled",
}

# timing_daily.v1 Frequency (at0003) units, the four the archetype allows → Timing.repeat.periodUnit (period 1).
FREQUENCY_UNITS = {"1/d": "d", "1/h": "h", "1/min": "min", "1/s": "s"}

# service_request.v1 at0068 Urgency → ServiceRequest.priority.
SERVICE_URGENCY = {"at0136": "stat", "at0137": "urgent", "at0138": "routine"}
