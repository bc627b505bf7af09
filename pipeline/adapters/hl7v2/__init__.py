"""The `hl7v2` adapter: an inbox table of raw HL7 v2 messages (ER7) → FHIR R4 resources."""

from .datatypes import Hl7Context
from .er7 import parse_er7
from .messages import Hl7Mapped, message_to_resources

__all__ = ["Hl7Context", "Hl7Mapped", "message_to_resources", "parse_er7"]
