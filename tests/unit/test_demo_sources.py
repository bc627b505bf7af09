"""The demo's openEHR and HL7 v2 hospitals: their data maps completely, to the shared person."""

from __future__ import annotations

import pytest

from pipeline.adapters.hl7v2 import Hl7Context, message_to_resources
from pipeline.adapters.openehr import composition_to_resources
from pipeline.demo import DEMO_SHARED_SYSTEM
from pipeline.demo_sources import demo_compositions, demo_messages, shared_person_kvnr
from pipeline.identity import shared_identifier

pytestmark = pytest.mark.unit


def test_demo_compositions_map_without_unmapped_archetypes_to_the_shared_person(config) -> None:
    site = config.sites["site-d"]
    for source, content in demo_compositions():
        mapped = composition_to_resources(content, source, site.zone, site.identifier_systems)
        assert not mapped.unmapped, source.uid
        assert shared_identifier(mapped.patient, DEMO_SHARED_SYSTEM) == shared_person_kvnr()


def test_demo_messages_map_without_problems_and_raise_the_tumour_board_flag(config) -> None:
    site = config.sites["site-c"]
    context = Hl7Context(site.site, site.zone, site.identifier_systems)
    mapped = [message_to_resources(raw, context) for raw in demo_messages()]
    assert [m.problems for m in mapped] == [[], []]
    patients = [m.resources[0] for m in mapped]
    assert all(shared_identifier(p, DEMO_SHARED_SYSTEM) for p in patients)
    assert shared_identifier(patients[1], DEMO_SHARED_SYSTEM) == shared_person_kvnr()
    flag = next(r for r in mapped[1].resources if r["resourceType"] == "Flag")
    assert flag["code"]["coding"][0]["code"] == "tumorboard" and flag["status"] == "active"
