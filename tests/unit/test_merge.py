import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.merge import merge_patient
from pipeline.records import RoutedResource
from tests.casebuilder import routed_record

pytestmark = pytest.mark.unit
KEY = "9b0a1f5e-0000-5000-8000-000000000001"


def patient(site: str, version: int, family: str, mrn: str, op: str = "UPDATE") -> RoutedResource:
    body = {
        "resourceType": "Patient",
        "id": KEY,
        "gender": "female",
        "birthDate": f"19{50 + version}-01-01",
        "name": [{"family": family}],
        "identifier": [
            {"system": "http://fhir.de/sid/gkv/kvid-10", "value": "A123456789"},
            {"system": f"urn:mrn:{site}", "value": mrn},
        ],
        "meta": {"tag": [{"system": "urn:cdrsync:origin-site", "code": site}]},
    }
    return routed_record(
        body,
        site=site,
        source_id=mrn,
        patient_key=KEY,
        op=op,
        origin=("t", 0, version),
        source_version=version,
        content_hash=None,
    )


def body(record: RoutedResource) -> dict:
    return orjson.loads(record.resource)


def test_first_site_owns_demographics_and_later_sites_add_identifiers() -> None:
    table: dict = {}
    merge_patient(table, patient("site-a", 1, "Müller", "a-1"))
    merged = body(merge_patient(table, patient("site-b", 2, "Mueller", "b-9")))
    assert merged["name"] == [{"family": "Müller"}] and merged["birthDate"] == "1951-01-01"
    assert {"system": "urn:mrn:site-b", "value": "b-9"} in merged["identifier"]
    assert [i for i in merged["identifier"] if i["system"].endswith("kvid-10")] == [
        {"system": "http://fhir.de/sid/gkv/kvid-10", "value": "A123456789"}
    ]
    assert {t["code"] for t in merged["meta"]["tag"]} == {"site-a", "site-b"}


def test_owner_updates_apply_and_a_site_leaving_removes_its_identifiers() -> None:
    table: dict = {}
    merge_patient(table, patient("site-a", 1, "Müller", "a-1"))
    merge_patient(table, patient("site-b", 2, "Mueller", "b-9"))
    assert body(merge_patient(table, patient("site-a", 3, "Müller-Lüdenscheidt", "a-1")))["name"] == [
        {"family": "Müller-Lüdenscheidt"}
    ]
    left = merge_patient(table, patient("site-b", 4, "", "b-9", op="DELETE"))
    assert left.op == "UPDATE" and {"system": "urn:mrn:site-b", "value": "b-9"} not in body(left)["identifier"]
    gone = merge_patient(table, patient("site-a", 5, "", "a-1", op="DELETE"))
    assert gone.is_delete and table == {}


@given(st.lists(st.sampled_from(["site-a", "site-b", "site-c"]), min_size=1, max_size=12))
def test_demographics_are_always_the_first_sites_latest_and_identifiers_the_union(senders) -> None:
    table: dict = {}
    latest: dict[str, RoutedResource] = {}
    for version, site in enumerate(senders, 1):
        record = patient(site, version, f"{site}-{version}", f"{site}-mrn")
        latest[site] = record
        merged = body(merge_patient(table, record))
    owner = senders[0]
    assert merged["name"] == body(latest[owner])["name"] and merged["birthDate"] == body(latest[owner])["birthDate"]
    expected = {(i["system"], i["value"]) for r in latest.values() for i in body(r)["identifier"]}
    got = [(i["system"], i["value"]) for i in merged["identifier"]]
    assert set(got) == expected and len(got) == len(expected)
