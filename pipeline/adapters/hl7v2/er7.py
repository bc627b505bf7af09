"""HL7 v2 ER7 access on top of python-hl7 (`hl7` on PyPI).

Why python-hl7 and not hl7apy: python-hl7 parses any ER7 message into fields, repetitions, components
and subcomponents with the message's own separators (MSH-1/MSH-2), and implements the escape sequences
(\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\Xhh\\) without imposing a version's message structure. hl7apy validates
against the structures of each HL7 version and rejects the site-specific Z-segments and the segments
real interfaces send out of place, which is exactly what an inbox of real messages contains. Both are
maintained; python-hl7 is small, pure Python and has no dependencies.

Positions are 1-based as in the HL7 standard (PID-3.4.2 is field 3, component 4, subcomponent 2).
An empty field and the null `""` both read as None: each message is applied in snapshot mode (the
segment's state replaces what was there), where an absent value and an explicit null both mean the
element is not present in the FHIR resource. `is_null` tells them apart where it matters.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import hl7

from ...errors import MappingError, shape

__all__ = ["NULL", "Message", "Rep", "Segment", "hl7_datetime", "parse_er7"]

NULL = '""'  # HL7 v2 explicit null (2.5.3.1: the receiver shall delete the value)

Tree = list[list[list[str]]]  # repetitions → components → subcomponents, raw (still escaped)


def _as_list(node: Any) -> list[Any]:
    return list(node) if isinstance(node, list) else [node]


def _tree(field: Any) -> Tree:
    """python-hl7 nests only as deep as separators occur; make every field three levels deep."""
    reps: Tree = []
    for rep in _as_list(field) if _is_rep_list(field) else [field]:
        reps.append([[str(sub) for sub in _as_list(comp)] for comp in _as_list(rep)])
    return reps


def _is_rep_list(field: Any) -> bool:
    return isinstance(field, hl7.Field) and any(isinstance(item, hl7.Repetition) for item in field)


@dataclass(frozen=True)
class Rep:
    """One repetition of a field: components, each a list of subcomponents (unescaped on access)."""

    components: list[list[str]]
    message: Message

    def c(self, component: int, sub: int = 1) -> str | None:
        """Component (and subcomponent) value, unescaped; None when empty or `""`."""
        if component > len(self.components) or sub > len(self.components[component - 1]):
            return None
        return self.message.text(self.components[component - 1][sub - 1])

    def is_null(self) -> bool:
        """True for the explicit null `""`."""
        return self.components == [[NULL]]

    def __bool__(self) -> bool:
        return any(s and s != NULL for comp in self.components for s in comp)


@dataclass(frozen=True)
class Segment:
    """One segment; fields by HL7 number (MSH numbering included: MSH-9 is the message type)."""

    name: str
    fields: list[Tree]
    message: Message

    def reps(self, field: int) -> list[Rep]:
        """The non-empty repetitions of a field."""
        if field >= len(self.fields):
            return []
        return [r for r in (Rep(comps, self.message) for comps in self.fields[field]) if r]

    def rep(self, field: int) -> Rep | None:
        """The first non-empty repetition of a field."""
        reps = self.reps(field)
        return reps[0] if reps else None

    def get(self, field: int, component: int = 1, sub: int = 1) -> str | None:
        """Field (component, subcomponent) of the first repetition; None when empty or `""`."""
        rep = self.rep(field)
        return rep.c(component, sub) if rep else None

    def is_null(self, field: int) -> bool:
        """True when the field is the explicit null `""`."""
        return field < len(self.fields) and self.fields[field] == [[[NULL]]]


class Message:
    """A parsed ER7 message."""

    def __init__(self, raw: str) -> None:
        text = raw.lstrip("\ufeff").strip()
        if not text.startswith("MSH"):
            raise MappingError("HL7 v2 message does not start with an MSH segment")
        # Segments end in CR on the wire; files and databases often carry LF or CRLF instead.
        lines = [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
        try:
            self._parsed = hl7.parse("\r".join(lines))
        except Exception as exc:  # python-hl7 raises several types on malformed input
            raise MappingError(f"HL7 v2 message cannot be parsed ({type(exc).__name__})") from None
        self.segments = [self._segment(s) for s in self._parsed]

    def _segment(self, parsed: Any) -> Segment:
        name = str(parsed[0])
        # python-hl7 already numbers MSH as the standard does (MSH-1 is the field separator).
        return Segment(name, [_tree(f) for f in parsed], self)

    def text(self, raw: str) -> str | None:
        """Unescape a leaf value; None for empty and for the explicit null."""
        if raw in ("", NULL):
            return None
        text = str(self._parsed.unescape(raw)) if self._parsed.esc in raw else raw
        return text.strip() or None  # senders pad fixed-width values with blanks

    def all(self, name: str) -> list[Segment]:
        """Every segment with this name, in order."""
        return [s for s in self.segments if s.name == name]

    def first(self, name: str) -> Segment | None:
        """The first segment with this name."""
        return next((s for s in self.segments if s.name == name), None)

    def groups(self, leader: str, members: tuple[str, ...]) -> Iterator[tuple[Segment, list[Segment]]]:
        """Each `leader` segment with the member segments after it, up to the next leader."""
        current: tuple[Segment, list[Segment]] | None = None
        for segment in self.segments:
            if segment.name == leader:
                if current:
                    yield current
                current = (segment, [])
            elif current and segment.name in members:
                current[1].append(segment)
        if current:
            yield current

    @property
    def msh(self) -> Segment:
        """The MSH segment."""
        return self.segments[0]

    @property
    def message_type(self) -> tuple[str, str]:
        """(MSH-9.1, MSH-9.2), e.g. ("ADT", "A01")."""
        return (self.msh.get(9, 1) or "", self.msh.get(9, 2) or "")

    @property
    def sender(self) -> str:
        """MSH-3 (sending application) and MSH-4 (sending facility), their namespace ids ('' when both are empty)."""
        application, facility = self.msh.rep(3), self.msh.rep(4)
        parts = [(rep.c(1) or rep.c(2) or "") if rep else "" for rep in (application, facility)]
        return "^".join(parts) if any(parts) else ""

    @property
    def control_id(self) -> str:
        """MSH-10."""
        return self.msh.get(10) or ""


def parse_er7(raw: str) -> Message:
    """Parse one ER7 message (MappingError when it is not one)."""
    return Message(raw)


_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,4})?([+-]\d{4})?$")


def hl7_datetime(value: str | None, tz: ZoneInfo, field: str | None = None) -> str | None:
    """HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]) → FHIR date/dateTime.

    A time without offset is read in the site's zone (FHIR requires an offset once hours are given).
    HL7 allows hours without minutes; FHIR does not, so HH becomes HH:00. An impossible date or time
    (30 February, hour 24) is a MappingError naming `field` (e.g. "OBX-14"), as a malformed one is.
    """
    if value is None:
        return None
    named = f"{field}: " if field else ""
    match = _TS.match(value.strip())
    if not match:
        raise MappingError(f"{named}{shape(value)} is not an HL7 v2 date/time")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    if hour is not None and (month is None or day is None):
        raise MappingError(f"{named}{shape(value)}: a time needs a full date")
    try:
        stamp = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0), int(second or 0))
    except ValueError:
        raise MappingError(f"{named}{shape(value)} is not a valid date/time") from None
    if offset and (int(offset[1:3]) > 14 or int(offset[3:]) > 59):
        raise MappingError(f"{named}{shape(value)} is not a valid date/time")
    if hour is None:
        return "-".join(p for p in (year, month, day) if p)
    text = stamp.isoformat()
    if fraction:
        text += fraction
    zone = offset or stamp.replace(tzinfo=tz).strftime("%z")
    return f"{text}{zone[:3]}:{zone[3:]}"
