"""The `openehr` adapter: a table of openEHR canonical-JSON compositions → FHIR R4 resources."""

from .composition import CompositionSource, Mapped, Unmapped, composition_to_resources
from .mappers import ENTRY_MAPPERS
from .to_openehr import resource_to_composition, writeback_uid

__all__ = [
    "ENTRY_MAPPERS",
    "CompositionSource",
    "Mapped",
    "Unmapped",
    "composition_to_resources",
    "resource_to_composition",
    "writeback_uid",
]
