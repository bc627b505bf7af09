"""HL7 v2 message structure and status edge cases: several patients in one message, narratives split over
OBX lines, cancelled documents and visits, deleted diagnoses, impossible dates."""

from __future__ import annotations

import base64
from zoneinfo import ZoneInfo

import pytest

from pipeline.adapters.hl7v2 import Hl7Context, message_to_resources
from pipeline.adapters.hl7v2.datatypes import hl7_source_id
from pipeline.adapters.hl7v2.er7 import hl7_datetime
from pipeline.errors import MappingError
from pipeline.resources import validate_resource

pytestmark = pytest.mark.unit
CTX = Hl7Context("site-c", ZoneInfo("Europe/Berlin"), {})
MSH = "MSH|^~\\&|HIS|SITEC|CDRSYNC|CENTRAL|20240301101500+0100||{type}|MSG1|P|2.5"
PID = "PID|1||4711^^^SITEC^MR||Muster^Erika||19640812|F"
PV1 = "PV1|1|I|ONK^12^3||||0815^Doc^Dora||||||||||||V-99^^^SITEC^VN|||||||||||||||||||||||||20240301090000"
OBR = "OBR|1||P-1^PATH|22634-0^Pathology report^LN|||20240301||||||||||||||||F"
PATIENT_REF = f"Patient/{hl7_source_id('Patient', 'SITEC', '4711')}"


def _message(*segments: str, type_: str) -> str:
    return "\r".join([MSH.format(type=type_), *segments])


def _of(mapped, resource_type: str) -> list[dict]:
    return [r for r in mapped.resources if r["resourceType"] == resource_type]


def _text(obx_id: int, line: str, code: str = "22637-3^Diagnosis^LN", sub: str = "") -> str:
    return f"OBX|{obx_id}|TX|{code}|{sub}|{line}||||||F"


# Several patients in one message


def test_a_result_message_with_two_patients_is_rejected_not_filed_under_the_first() -> None:
    second = "PID|1||4712^^^SITEC^MR||Other^Otto||19500101|M"
    raw = _message(
        PID, PV1, OBR, "OBX|1|NM|8867-4^HR^LN||72|/min|||||F",
        second, "OBR|1||P-2^PATH|22634-0^Pathology report^LN", "OBX|1|NM|8867-4^HR^LN||99|/min|||||F",
        type_="ORU^R01",
    )  # fmt: skip
    with pytest.raises(MappingError, match="ORU\\^R01 message MSG1 carries 2 PID segments") as raised:
        message_to_resources(raw, CTX)
    assert "4712" not in str(raised.value) and "Otto" not in str(raised.value)


def test_a_message_with_two_visits_is_rejected() -> None:
    other_visit = PV1.replace("V-99", "V-77")
    with pytest.raises(MappingError, match="carries 2 PV1 segments"):
        message_to_resources(_message(PID, PV1, OBR, other_visit, type_="ORU^R01"), CTX)


# A narrative split over OBX lines


def test_a_narrative_over_several_text_lines_is_one_observation_with_every_line() -> None:
    lines = ["Invasive ductal carcinoma,", "grade 3, pT2 pN1a.", "HER2 negative."]
    raw = _message(PID, PV1, OBR, *(_text(n, line) for n, line in enumerate(lines, 1)), type_="ORU^R01")
    mapped = message_to_resources(raw, CTX)
    assert mapped.problems == []
    (observation,) = _of(mapped, "Observation")
    assert observation["valueString"] == "\n".join(lines)
    (report,) = _of(mapped, "DiagnosticReport")
    assert report["result"] == [{"reference": f"Observation/{observation['id']}"}]
    # the id of a one-line text, as before: report scope, OBX-3 code, OBX-4 sub-id
    assert observation["id"] == hl7_source_id("Observation", "PATH|P-1", "22637-3", None)
    validate_resource(observation)


def test_a_single_text_line_keeps_its_id_and_value() -> None:
    mapped = message_to_resources(_message(PID, PV1, OBR, _text(1, "No tumour."), type_="ORU^R01"), CTX)
    (observation,) = _of(mapped, "Observation")
    assert observation["id"] == hl7_source_id("Observation", "PATH|P-1", "22637-3", None)
    assert observation["valueString"] == "No tumour."


def test_a_blank_line_inside_a_narrative_is_kept() -> None:
    raw = _message(PID, PV1, OBR, _text(1, "Macroscopy:"), _text(2, ""), _text(3, "3 cm."), type_="ORU^R01")
    (observation,) = _of(message_to_resources(raw, CTX), "Observation")
    assert observation["valueString"] == "Macroscopy:\n\n3 cm."


def test_lines_with_their_own_sub_ids_stay_separate_observations() -> None:
    raw = _message(PID, PV1, OBR, _text(1, "first", sub="1"), _text(2, "second", sub="2"), type_="ORU^R01")
    mapped = message_to_resources(raw, CTX)
    assert [o["valueString"] for o in _of(mapped, "Observation")] == ["first", "second"]
    assert mapped.problems == []


def test_text_lines_without_an_identifier_are_each_reported() -> None:
    raw = _message(PID, PV1, OBR, _text(1, "first", code=""), _text(2, "second", code=""), type_="ORU^R01")
    mapped = message_to_resources(raw, CTX)
    assert mapped.problems == [
        "OBX (segment 5): OBX-3 (observation identifier) is empty",
        "OBX (segment 6): OBX-3 (observation identifier) is empty",
    ]


def test_results_with_the_same_code_apart_from_each_other_are_reported_by_set_id() -> None:
    raw = _message(
        PID, PV1, OBR, _text(1, "first"), "OBX|2|NM|8867-4^HR^LN||72|/min|||||F", _text(3, "again"),
        type_="ORU^R01",
    )  # fmt: skip
    mapped = message_to_resources(raw, CTX)
    first_id = hl7_source_id("Observation", "PATH|P-1", "22637-3", None)
    assert mapped.problems == [
        f"OBX (segment 5, set id 1) and OBX (segment 7, set id 3) map to the same Observation (id {first_id})"
        " with different content"
    ]
    (report,) = _of(mapped, "DiagnosticReport")
    references = [r["reference"] for r in report["result"]]
    assert len(references) == len(set(references)) == 2


def test_the_same_result_sent_twice_is_one_result_and_one_sent_twice_differently_is_reported() -> None:
    obx = "OBX|{n}|NM|8867-4^HR^LN||{value}|/min|||||F"
    twice = [obx.format(n=1, value=72), obx.format(n=2, value=72)]
    mapped = message_to_resources(_message(PID, PV1, OBR, *twice, type_="ORU^R01"), CTX)
    assert mapped.problems == []  # nothing of the second is lost
    (report,) = [r for r in mapped.resources if r["resourceType"] == "DiagnosticReport"]
    assert len(report["result"]) == 1
    assert len([r for r in mapped.resources if r["resourceType"] == "Observation"]) == 1
    differing = [obx.format(n=1, value=72), obx.format(n=2, value=150)]
    mapped = message_to_resources(_message(PID, PV1, OBR, *differing, type_="ORU^R01"), CTX)
    assert len(mapped.problems) == 1
    assert "OBX (segment 5, set id 1) and OBX (segment 6, set id 2) map to the same Observation" in mapped.problems[0]


def test_a_document_sent_as_text_lines_is_one_attachment() -> None:
    txa = "TXA|1|PN|TX|20240301100000||||||||DOC-1|||||AU||AV"
    raw = _message(
        PID,
        PV1,
        txa,
        _text(1, "Findings:", code="11526-1^Path^LN"),
        _text(2, "benign.", code="11526-1^Path^LN"),
        type_="MDM^T02",
    )
    mapped = message_to_resources(raw, CTX)
    assert mapped.problems == []
    (document,) = _of(mapped, "DocumentReference")
    (content,) = document["content"]
    assert base64.b64decode(content["attachment"]["data"]).decode() == "Findings:\nbenign."


# Document status (TXA-17, TXA-19, MDM^T11)

TXA = "TXA|1|PN|TX|20240301100000||||||||DOC-1|||||{completion}||{availability}"
CONTENT = "OBX|1|TX|11526-1^Path^LN||Adenocarcinoma.||||||F"


def _document(completion: str, availability: str, event: str = "T02", *more: str) -> dict:
    txa = TXA.format(completion=completion, availability=availability)
    mapped = message_to_resources(_message(PID, PV1, txa, *more, type_=f"MDM^{event}"), CTX)
    assert mapped.problems == []
    (document,) = _of(mapped, "DocumentReference")
    validate_resource(document)
    return document


@pytest.mark.parametrize(
    ("completion", "availability", "status", "doc_status"),
    [
        ("AU", "AV", "current", "final"),
        ("LA", "", "current", "final"),
        ("DI", "AV", "current", "preliminary"),
        ("AU", "OB", "superseded", "final"),
        ("AU", "CA", "entered-in-error", "final"),
        ("AU", "UN", "current", "preliminary"),  # not released for patient care
        ("DO", "UN", "current", "preliminary"),
    ],
)
def test_document_status_follows_availability_and_completion(completion, availability, status, doc_status) -> None:
    document = _document(completion, availability, "T02", CONTENT)
    assert (document["status"], document["docStatus"]) == (status, doc_status)


def test_a_cancelled_document_is_entered_in_error_and_keeps_its_id() -> None:
    current = _document("AU", "AV", "T02", CONTENT)
    cancelled = _document("AU", "UN", "T11")  # MDM^T11 carries no OBX
    assert cancelled["id"] == current["id"]
    assert cancelled["status"] == "entered-in-error"
    (content,) = cancelled["content"]
    assert content["attachment"] == {
        "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]
    }


def test_a_cancel_that_does_not_name_its_document_is_a_problem_not_a_new_document() -> None:
    """Without TXA-12 the cancel would be keyed by its own message: a new, cancelled document beside the
    original, which would stay current."""
    for event, availability in (("T11", "UN"), ("T02", "CA"), ("T02", "OB")):
        txa = TXA.format(completion="AU", availability=availability).replace("|DOC-1|", "||")
        mapped = message_to_resources(_message(PID, PV1, txa, CONTENT, type_=f"MDM^{event}"), CTX)
        assert _of(mapped, "DocumentReference") == []
        assert any("TXA-12 (unique document number) is empty" in problem for problem in mapped.problems), event


def test_a_cancel_that_carries_the_content_keeps_it() -> None:
    cancelled = _document("AU", "UN", "T11", CONTENT)
    assert cancelled["status"] == "entered-in-error"
    assert base64.b64decode(cancelled["content"][0]["attachment"]["data"]) == b"Adenocarcinoma."


def test_a_status_change_without_content_is_still_rejected() -> None:
    """PUT replaces the document: without its content only a withdrawal may be written."""
    with pytest.raises(MappingError, match="no document content"):
        message_to_resources(_message(PID, PV1, TXA.format(completion="AU", availability="OB"), type_="MDM^T03"), CTX)


@pytest.mark.parametrize(
    ("completion", "availability", "reason"),
    [
        ("AU", "XX", "TXA-19 availability status 'XX' is not one of AV, CA, OB, UN"),
        ("ZZ", "AV", "TXA-17 completion status 'ZZ' is not one of AU, DI, DO, IN, IP, LA, PA"),
    ],
)
def test_an_unknown_document_status_is_reported(completion, availability, reason) -> None:
    txa = TXA.format(completion=completion, availability=availability)
    mapped = message_to_resources(_message(PID, PV1, txa, CONTENT, type_="MDM^T02"), CTX)
    assert mapped.problems == [f"TXA (segment 4): {reason}"]
    assert _of(mapped, "DocumentReference") == []


# Cancelled visits, deleted diagnoses


def test_a_cancelled_admission_cancels_the_same_encounter() -> None:
    (admitted,) = _of(message_to_resources(_message(PID, PV1, type_="ADT^A01"), CTX), "Encounter")
    (cancelled,) = _of(message_to_resources(_message(PID, PV1, type_="ADT^A11"), CTX), "Encounter")
    assert cancelled["id"] == admitted["id"]
    assert (admitted["status"], cancelled["status"]) == ("in-progress", "cancelled")


DG1 = "DG1|1||C50.9^Breast cancer^I10||20240301|F||||||||||||||D-1|{action}"


@pytest.mark.parametrize("action", ["", "A", "U", "X"])
def test_a_diagnosis_added_or_updated_is_a_condition(action) -> None:
    mapped = message_to_resources(_message(PID, PV1, DG1.format(action=action), type_="ADT^A08"), CTX)
    assert mapped.problems == [] and len(_of(mapped, "Condition")) == 1


def test_a_deleted_diagnosis_is_reported_never_upserted() -> None:
    mapped = message_to_resources(_message(PID, PV1, DG1.format(action="D"), type_="ADT^A08"), CTX)
    assert _of(mapped, "Condition") == []
    assert mapped.problems == [
        "DG1 (segment 4): DG1-21 action code D (delete): the hl7v2 adapter does not delete a Condition"
    ]


def test_a_deleted_procedure_is_reported_never_upserted() -> None:
    pr1 = "PR1|1||0T5B0ZZ^Mastectomy^I10P||20240301||||||||||||||P-1|D"
    mapped = message_to_resources(_message(PID, PV1, pr1, type_="ADT^A08"), CTX)
    assert _of(mapped, "Procedure") == []
    assert mapped.problems == [
        "PR1 (segment 4): PR1-20 action code D (delete): the hl7v2 adapter does not delete a Procedure"
    ]


# Impossible dates


@pytest.mark.parametrize("value", ["202402301000", "20240230", "202413", "202403012460", "202403011000+2500"])
def test_an_impossible_date_is_a_mapping_error_never_a_value_error(value) -> None:
    with pytest.raises(MappingError, match="is not a valid date/time"):
        hl7_datetime(value, ZoneInfo("Europe/Berlin"))


def test_an_impossible_result_time_is_a_problem_of_that_segment_and_the_rest_flows() -> None:
    raw = _message(
        PID, PV1, OBR, "OBX|1|NM|8867-4^HR^LN||72|/min|||||F|||202402301000",
        "OBX|2|NM|2345-7^Glucose^LN||5|mmol/L|||||F", type_="ORU^R01",
    )  # fmt: skip
    mapped = message_to_resources(raw, CTX)
    assert mapped.problems == ["OBX (segment 5): OBX-14: '999999999999' is not a valid date/time"]
    (observation,) = _of(mapped, "Observation")
    assert observation["code"]["coding"][0]["code"] == "2345-7"
    (report,) = _of(mapped, "DiagnosticReport")
    assert report["result"] == [{"reference": f"Observation/{observation['id']}"}]


def test_an_impossible_report_time_is_a_problem_of_the_report_and_its_results_flow() -> None:
    obr = OBR.replace("|20240301|", "|20240230|")
    mapped = message_to_resources(_message(PID, PV1, obr, "OBX|1|NM|8867-4^HR^LN||72|/min|||||F", type_="ORU^R01"), CTX)
    assert mapped.problems == ["OBR (segment 4): OBR-7: '99999999' is not a valid date/time"]
    assert len(_of(mapped, "Observation")) == 1 and _of(mapped, "DiagnosticReport") == []


def test_a_report_number_without_its_authority_is_the_sending_application_s() -> None:
    """Two applications of one hospital numbering their reports alike, without EI-2 (here for two patients):
    each report keeps an id of its own, where one id made the later overwrite the earlier. A number with its
    authority is the same report whoever sends it."""
    bare = "OBR|1||12345|2951-2^Sodium^LN|||20240301||||||||||||||||F"
    obx = "OBX|1|NM|2951-2^Sodium^LN||{value}|mmol/L|||||F"

    def report(sender: str, pid: str, obr: str, value: int) -> dict:
        raw = _message(pid, obr, obx.format(value=value), type_="ORU^R01").replace("|HIS|", f"|{sender}|", 1)  # MSH-3
        (found,) = _of(message_to_resources(raw, CTX), "DiagnosticReport")
        return found

    other_patient = "PID|1||4712^^^SITEC^MR||Muster^Max||19600101|M"
    lab, poct = report("LIS", PID, bare, 140), report("POCT", other_patient, bare, 118)
    assert lab["id"] != poct["id"] and lab["result"] != poct["result"]
    assert report("LIS", PID, bare, 141)["id"] == lab["id"]  # a corrected result updates its report
    with_authority = bare.replace("|12345|", "|12345^LAB|")
    assert report("LIS", PID, with_authority, 140)["id"] == report("POCT", PID, with_authority, 140)["id"]
