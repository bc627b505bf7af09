"""Site adapters: a captured source row → FHIR R4 resources. Pure functions."""

from .fhir import row_to_resource

__all__ = ["row_to_resource"]
