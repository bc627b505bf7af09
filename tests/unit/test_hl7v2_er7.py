"""HL7 v2 parsing and mapping edge cases: escapes, repetitions, components, empty vs null, Z-segments."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest

from pipeline.adapters.hl7v2 import Hl7Context, message_to_resources, parse_er7
from pipeline.adapters.hl7v2.datatypes import hl7_source_id
from pipeline.adapters.hl7v2.er7 import hl7_datetime
from pipeline.errors import MappingError
from pipeline.resources import validate_resource

pytestmark = pytest.mark.unit
CTX = Hl7Context("site-c", ZoneInfo("Europe/Berlin"), {"KVK": "http://fhir.de/sid/gkv/kvid-10"})
MSH = "MSH|^~\\&|HIS|SITEC|CDRSYNC|CENTRAL|20240301101500+0100||{type}|MSG{n}|P|2.5"
PID = "PID|1||4711^^^SITEC^MR~A123456789^^^KVK^NI||Muster^Erika^M||19640812|F"
PV1 = "PV1|1|I|ONK^12^3||||0815^Doc^Dora||||||||||||V-99^^^SITEC^VN|||||||||||||||||||||||||20240301090000"


def _message(*segments: str, type_: str = "ADT^A08", n: int = 1, sep: str = "\r") -> str:
    return sep.join([MSH.format(type=type_, n=n), *segments])


def test_escape_sequences_are_decoded() -> None:
    pid = parse_er7(_message(r"PID|1||1^^^A^MR||O\T\Brien\F\x\S\y\R\z\E\w^Anna")).first("PID")
    assert pid.get(5, 1) == "O&Brien|x^y~z\\w"
    assert pid.get(5, 2) == "Anna"


def test_repetitions_components_and_subcomponents() -> None:
    pid = parse_er7(_message("PID|1||1^^^AUTH&1.2.3&ISO^MR~2^^^OTHER^PI")).first("PID")
    reps = pid.reps(3)
    assert [(r.c(1), r.c(4, 1), r.c(4, 2), r.c(5)) for r in reps] == [
        ("1", "AUTH", "1.2.3", "MR"),
        ("2", "OTHER", None, "PI"),
    ]


def test_empty_and_explicit_null_both_read_as_absent_but_null_is_known() -> None:
    pid = parse_er7(_message('PID|1||1^^^A^MR||""||')).first("PID")
    assert pid.get(5) is None and pid.is_null(5)
    assert pid.get(7) is None and not pid.is_null(7)


def test_null_never_becomes_a_literal_value_in_fhir() -> None:
    raw = _message('PID|1||4711^^^SITEC^MR||Muster^""||""|""', PV1)
    patient = message_to_resources(raw, CTX).resources[0]
    assert '""' not in str(patient)
    assert patient["name"] == [{"family": "Muster"}]
    assert "gender" not in patient and "birthDate" not in patient


@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"])
def test_segment_separators_cr_lf_and_crlf_and_a_bom(sep: str) -> None:
    message = parse_er7("\ufeff" + _message(PID, PV1, sep=sep))
    assert [s.name for s in message.segments] == ["MSH", "PID", "PV1"]
    assert message.message_type == ("ADT", "A08") and message.control_id == "MSG1"


def test_hl7_times_keep_their_offset_and_local_times_take_the_site_zone() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    assert hl7_datetime("20240301101500+0100", berlin) == "2024-03-01T10:15:00+01:00"
    assert hl7_datetime("20240701101500", berlin) == "2024-07-01T10:15:00+02:00"
    assert hl7_datetime("2024070110", berlin) == "2024-07-01T10:00:00+02:00"
    assert hl7_datetime("202407", berlin) == "2024-07"
    with pytest.raises(MappingError):
        hl7_datetime("01.07.2024", berlin)


def test_a_malformed_birth_date_is_named_by_its_shape_never_its_value() -> None:
    """The message goes into logs, dead-letter headers and the audit: a birth date there is patient data."""
    pid = PID.split("|")
    pid[7] = "1962-04-17"
    with pytest.raises(MappingError) as raised:
        message_to_resources(_message("|".join(pid), PV1), CTX)
    assert "1962" not in str(raised.value) and "04-17" not in str(raised.value)
    assert "'9999-99-99' is not an HL7 v2 date/time" in str(raised.value)


def test_identifier_systems_come_from_the_site_file_by_assigning_authority() -> None:
    patient = message_to_resources(_message(PID, PV1), CTX).resources[0]
    assert {"system": "http://fhir.de/sid/gkv/kvid-10", "value": "A123456789"} in [
        {k: i[k] for k in ("system", "value")} for i in patient["identifier"]
    ]
    assert patient["identifier"][0]["system"] == "urn:cdrsync:site-c:authority:SITEC"


def test_ids_are_deterministic_across_resends_and_independent_of_control_id() -> None:
    first = message_to_resources(_message(PID, PV1, n=1), CTX).resources
    again = message_to_resources(_message(PID, PV1, n=2), CTX).resources
    assert [r["id"] for r in first] == [r["id"] for r in again]


def test_tumour_board_flag_segment_becomes_a_flag_on_the_encounter() -> None:
    raw = _message(PID, PV1, "ZTB|1|tumorboard^Tumour board^urn:cdrsync:flag|A|20240301100000||0815^Doc^Dora")
    mapped = message_to_resources(raw, CTX)
    assert not mapped.problems
    flag = next(r for r in mapped.resources if r["resourceType"] == "Flag")
    encounter = next(r for r in mapped.resources if r["resourceType"] == "Encounter")
    validate_resource(flag)
    assert flag["code"]["coding"][0] == {"system": "urn:cdrsync:flag", "code": "tumorboard", "display": "Tumour board"}
    assert flag["status"] == "active" and flag["encounter"] == {"reference": f"Encounter/{encounter['id']}"}
    closed = message_to_resources(raw.replace("|A|2024", "|I|2024"), CTX).resources
    assert next(r for r in closed if r["resourceType"] == "Flag")["id"] == flag["id"]


def test_a_flag_segment_with_another_code_is_reported() -> None:
    mapped = message_to_resources(_message(PID, PV1, "ZTB|1|other|A"), CTX)
    assert mapped.problems == ["ZTB (segment 4): ZTB-2 flag code 'other' is not 'tumorboard'"]
    assert "Flag" not in [r["resourceType"] for r in mapped.resources]


def test_a_merge_is_the_surviving_patient_and_the_merged_record_replaced_by_it() -> None:
    survivor, merged = message_to_resources(_message(PID, "MRG|0815^^^SITEC^MR", type_="ADT^A40"), CTX).resources
    assert survivor == message_to_resources(_message(PID), CTX).resources[0]  # PID as in any ADT
    assert merged["id"] == hl7_source_id("Patient", "SITEC", "0815")  # the id its own messages gave it
    assert merged["id"] != survivor["id"] and merged["active"] is False
    assert merged["link"] == [{"other": {"reference": f"Patient/{survivor['id']}"}, "type": "replaced-by"}]
    # Where its records belong now (the surviving record's numbers, the shared one among them), and its own.
    assert {"system": "http://fhir.de/sid/gkv/kvid-10", "value": "A123456789"} in [
        {k: i[k] for k in ("system", "value")} for i in merged["identifier"] if i.get("use") != "old"
    ]
    assert [i["value"] for i in merged["identifier"] if i.get("use") == "old"] == ["0815"]
    validate_resource(merged)


@pytest.mark.parametrize(
    ("segments", "reason"),
    [
        ((PID,), "a PID with 0 MRG segments"),
        ((PID, "MRG|0815^^^SITEC^MR", "MRG|0816^^^SITEC^MR"), "a PID with 2 MRG segments"),
        ((PID, "MRG|4711^^^SITEC^MR"), "merges a patient into itself"),
        ((PID, "MRG|"), "MRG-1 .* is empty"),
    ],
)
def test_a_merge_that_does_not_name_one_other_record_is_rejected(segments, reason) -> None:
    with pytest.raises(MappingError, match=reason):
        message_to_resources(_message(*segments, type_="ADT^A40"), CTX)


def test_an_unknown_segment_is_reported_not_ignored() -> None:
    mapped = message_to_resources(_message(PID, PV1, "ZXY|1|secret"), CTX)
    assert mapped.problems == ["ZXY (segment 4): segment ZXY is not known to the hl7v2 adapter"]


@pytest.mark.parametrize(
    ("obx", "value"),
    [
        (
            "OBX|1|NM|8867-4^Heart rate^LN||72|/min^/min^UCUM|||||F",
            {"valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}},
        ),
        (
            "OBX|1|SN|2345-7^Glucose^LN||<^5|mmol/L^^UCUM|||||F",
            {
                "valueQuantity": {
                    "value": 5,
                    "unit": "mmol/L",
                    "system": "http://unitsofmeasure.org",
                    "code": "mmol/L",
                    "comparator": "<",
                }
            },
        ),
        (
            "OBX|1|SN|5-1^Titer^LN||^1^:^128||||||F",
            {"valueRatio": {"numerator": {"value": 1}, "denominator": {"value": 128}}},
        ),
        ("OBX|1|ST|8-1^Comment^LN||first~second||||||F", {"valueString": "first\nsecond"}),
        (
            "OBX|1|CWE|9-1^Result^LN||260385009^Negative^SCT||||||F",
            {
                "valueCodeableConcept": {
                    "coding": [{"system": "http://snomed.info/sct", "code": "260385009", "display": "Negative"}],
                    "text": "Negative",
                }
            },
        ),
    ],
)
def test_obx_value_types(obx: str, value: dict) -> None:
    mapped = message_to_resources(
        _message(PID, PV1, "OBR|1||F1^LAB|1-1^Panel^LN|||20240301||||||||||||||||F", obx, type_="ORU^R01"), CTX
    )
    observation = next(r for r in mapped.resources if r["resourceType"] == "Observation")
    validate_resource(observation)
    assert {k: v for k, v in observation.items() if k.startswith("value")} == value


def test_a_repeated_numeric_result_is_reported_not_truncated() -> None:
    mapped = message_to_resources(_message(PID, PV1, "OBX|1|NM|8867-4^HR^LN||60~120|/min||||F"), CTX)
    assert mapped.problems == ["OBX (segment 4): OBX-5 of type NM repeats (2 values); an Observation holds one"]
    assert "Observation" not in [r["resourceType"] for r in mapped.resources]


def test_a_message_without_a_patient_is_rejected() -> None:
    with pytest.raises(MappingError, match="no PID"):
        message_to_resources(_message(PV1), CTX)


def test_not_hl7_is_rejected() -> None:
    with pytest.raises(MappingError, match="MSH"):
        message_to_resources("{}", CTX)
