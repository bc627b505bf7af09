"""Golden tests: every shared openEHR example composition maps to its reviewed expected output."""

from __future__ import annotations

import orjson
import pytest

from pipeline.resources import validate_resource
from tests.golden.openehr_cases import GOLDEN, mapped_case, samples

pytestmark = pytest.mark.unit


def test_every_shared_composition_has_a_golden_file() -> None:
    assert samples(), "no shared example compositions found"
    assert sorted(p.stem for p in samples()) == sorted(p.stem for p in GOLDEN.glob("*.json"))


@pytest.mark.parametrize("sample", samples(), ids=lambda p: p.stem)
def test_composition_maps_to_its_golden_output(sample) -> None:
    expected = orjson.loads((GOLDEN / f"{sample.stem}.json").read_bytes())
    actual = orjson.loads(orjson.dumps(mapped_case(sample)))  # same JSON types as the file
    assert actual["patient"] == expected["patient"]
    assert actual["unmapped"] == expected["unmapped"]
    assert [r["resourceType"] for r in actual["resources"]] == [r["resourceType"] for r in expected["resources"]]
    for got, want in zip(actual["resources"], expected["resources"], strict=True):
        assert got == want, f"{want['resourceType']}/{want['id']} differs"


@pytest.mark.parametrize("sample", samples(), ids=lambda p: p.stem)
def test_every_mapped_resource_is_valid_fhir(sample) -> None:
    case = mapped_case(sample)
    for resource in [case["patient"], *case["resources"]]:
        validate_resource(resource)


@pytest.mark.parametrize("sample", samples(), ids=lambda p: p.stem)
def test_every_resource_references_resources_of_the_same_composition(sample) -> None:
    case = mapped_case(sample)
    known = {f"{r['resourceType']}/{r['id']}" for r in [case["patient"], *case["resources"]]}
    for resource in case["resources"]:
        for reference in _references(resource):
            assert reference in known, f"{resource['resourceType']} points at {reference} outside the composition"


def _references(node):
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield node["reference"]
        for value in node.values():
            yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)
