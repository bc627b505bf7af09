"""Provenance wiring for the order stage (pipeline/provenance.py): one Provenance per central resource."""

from __future__ import annotations

from pipeline.provenance import add_provenance
from pipeline.records import RoutedResource
from pipeline.staging import current

from .app import config
from .topics import patient_sources_by_patient_key, released_by_reference

__all__ = ["with_provenance"]

_SITES = [site.site for site in config.source_sites()]
_DISPLAYS = {site.site: site.display_name for site in config.sites.values()}


def with_provenance(releasable: list[RoutedResource]) -> list[RoutedResource]:
    """Released records, deletes carrying their Provenance, then a Provenance for each first release.

    Reads the order stage's tables before this record's staged changes are applied.
    """
    released, patients = current(released_by_reference), current(patient_sources_by_patient_key)
    return add_provenance(releasable, released, patients, _SITES, _DISPLAYS)
