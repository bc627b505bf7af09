import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.ids import target_id

pytestmark = pytest.mark.unit

sites = st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True)
types = st.sampled_from(["Patient", "Encounter", "Observation", "Condition"])
fhir_ids = st.from_regex(r"[A-Za-z0-9\-.]{1,64}", fullmatch=True)


@given(sites, types, fhir_ids)
def test_same_source_gives_the_same_id(site: str, resource_type: str, source_id: str) -> None:
    assert target_id(site, resource_type, source_id) == target_id(site, resource_type, source_id)


@given(sites, sites, types, fhir_ids)
def test_same_source_id_at_two_sites_gives_two_ids(
    site_a: str, site_b: str, resource_type: str, source_id: str
) -> None:
    if site_a != site_b:
        assert target_id(site_a, resource_type, source_id) != target_id(site_b, resource_type, source_id)


@given(st.lists(st.tuples(sites, types, fhir_ids), unique=True, max_size=200))
def test_distinct_sources_never_collide(sources: list[tuple[str, str, str]]) -> None:
    ids = {target_id(*source) for source in sources}
    assert len(ids) == len(sources)


def test_ids_are_valid_fhir_ids_and_fixed_across_releases() -> None:
    value = target_id("site-a", "Patient", "9e909e52-61a1-be50-1878-a12ef8c36346")
    assert uuid.UUID(value).version == 5
    assert len(value) <= 64
    # Pinned: a changed namespace would re-create every resource under a new id at every target.
    assert value == "e35201f7-b682-5987-8030-d7bfd016d309"
