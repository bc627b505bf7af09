"""An openEHR COMPOSITION → the FHIR resources it holds: its Encounter, and what each entry maps to.

The composition is walked in document order; SECTIONs are containers, ENTRYs are mapped by their
archetype id (mappers.ENTRY_MAPPERS). An entry (or context cluster) whose archetype has no mapper is
returned as Unmapped: the caller turns it into a dead letter naming the archetype, never drops it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from ...errors import MappingError
from .context import Context, entry_source_id
from .mappers import CONTEXT_CLUSTERS, ENTRY_MAPPERS
from .rm import coded_to_codeable, element_value, fhir_datetime, local_code, text_of
from .rules import SETTING_TO_CLASS

__all__ = ["CompositionSource", "Mapped", "Unmapped", "composition_to_resources", "located_entries", "walk_entries"]

_ENTRY_TYPES = frozenset({"OBSERVATION", "EVALUATION", "INSTRUCTION", "ACTION", "ADMIN_ENTRY", "GENERIC_ENTRY"})
_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


@dataclass(frozen=True)
class CompositionSource:
    """The row a composition was captured from: who it is about and which version it is."""

    uid: str  # versioned object uid, without ::system::version
    system_id: str
    version: int
    ehr_id: str
    subject_id: str
    subject_namespace: str

    @property
    def version_uid(self) -> str:
        """The OBJECT_VERSION_ID of this version (uid::system::version)."""
        return f"{self.uid}::{self.system_id}::{self.version}"


@dataclass(frozen=True)
class Unmapped:
    """An archetyped node no mapping rule covers; `path` locates it without node names (located_entries)."""

    archetype_id: str
    path: str


@dataclass(frozen=True)
class Failed:
    """An entry its mapping rule refused (`isolate`): `path` is its stable path, `reason` names it by `where`."""

    path: str
    reason: str


@dataclass
class Mapped:
    """What a composition became: the Patient of its EHR first, then its resources; and what is unmapped.

    `entries`: each entry's stable path → (type, id) of the resources it became; `failed`: the entries whose
    mapping rule refused them (only with `isolate`)."""

    patient: dict[str, Any]
    resources: list[dict[str, Any]] = field(default_factory=list)
    unmapped: list[Unmapped] = field(default_factory=list)
    entries: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    failed: list[Failed] = field(default_factory=list)


def walk_entries(nodes: list[Any], path: str, attribute: str = "content") -> Iterator[tuple[dict[str, Any], str]]:
    """(entry, stable path) for every ENTRY below these nodes, through SECTIONs.

    A path step is `attribute[archetype id and name/value='name',n]` (openEHR path syntax plus n, the
    count of earlier siblings with the same archetype and name), so adding or removing a node with
    another archetype or name (e.g. another IPS section) does not renumber this one.
    """
    for entry, stable, _ in located_entries(nodes, path, path, attribute):
        yield entry, stable


def located_entries(
    nodes: list[Any], path: str, where: str, attribute: str = "content"
) -> Iterator[tuple[dict[str, Any], str, str]]:
    """(entry, stable path, where) for every ENTRY: `where` names the same entry without node names.

    A node's name is data (a template names it, but a composition may name it in free text): `where`, the
    path for error messages and dead letters, has steps `attribute[archetype id,k]`, k counting the earlier
    siblings with the same archetype whatever their name, so it still points at exactly one entry.
    """
    seen: Counter[tuple[str, str]] = Counter()
    seen_archetype: Counter[str] = Counter()
    for node in nodes:
        if not isinstance(node, dict):
            continue
        node_id = str(node.get("archetype_node_id", ""))
        name = str((node.get("name") or {}).get("value", "")).replace("'", "")
        step = f"{path}/{attribute}[{node_id} and name/value='{name}',{seen[node_id, name]}]"
        where_step = f"{where}/{attribute}[{node_id},{seen_archetype[node_id]}]"
        seen[node_id, name] += 1
        seen_archetype[node_id] += 1
        if node.get("_type") == "SECTION":
            yield from located_entries(node.get("items") or [], step, where_step, "items")
        elif node.get("_type") in _ENTRY_TYPES:
            yield node, step, where_step
        else:
            raise MappingError(f"unexpected {node.get('_type')} {node_id} at {where_step} in a composition's content")


def patient_of(source: CompositionSource, identifier_systems: dict[str, str]) -> dict[str, Any]:
    """The EHR's subject (EHR_STATUS.subject.external_ref) → a Patient carrying its identifier."""
    system = identifier_systems.get(source.subject_namespace, f"urn:cdrsync:namespace:{source.subject_namespace}")
    return {
        "resourceType": "Patient",
        "id": source.ehr_id,
        "identifier": [
            {"system": system, "value": source.subject_id},
            {"system": "urn:cdrsync:openehr:ehr-id", "value": source.ehr_id},
        ],
    }


def _party(party: dict[str, Any] | None) -> dict[str, Any] | None:
    """PARTY_IDENTIFIED → a logical Reference (display, and identifier from its external_ref)."""
    if not party or not party.get("name"):
        return None
    reference: dict[str, Any] = {"display": str(party["name"])}
    ref = party.get("external_ref") or {}
    if (ref.get("id") or {}).get("value"):
        reference["identifier"] = {
            "system": f"urn:cdrsync:namespace:{ref.get('namespace', 'unknown')}",
            "value": str(ref["id"]["value"]),
        }
    return reference


def _encounter_class(setting: dict[str, Any] | None) -> dict[str, Any]:
    code = local_code(setting)
    if code in SETTING_TO_CLASS:
        act, display = SETTING_TO_CLASS[code]
        return {"system": _ACT_CODE, "code": act, "display": display}
    # "other care" (238) or no setting: not any class of the value set, which NullFlavor OTH says exactly.
    return {"system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "code": "OTH", "display": "other"}


def composition_to_encounter(composition: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """COMPOSITION.context → Encounter (start/end time, setting as class and type, composer, location)."""
    context = composition["context"]
    end = context.get("end_time")
    composer = _party(composition.get("composer"))
    facility = _party(context.get("health_care_facility"))
    return ctx.resource(
        "Encounter",
        "/context",
        status="finished",  # an event composition records care that took place
        **{"class": _encounter_class(context.get("setting"))},
        type=[c for c in [coded_to_codeable(context.get("setting"), "")] if c],
        subject=ctx.subject,
        period={k: v for k, v in (("start", ctx.start_time), ("end", _end(end, ctx))) if v},
        participant=[
            {
                "type": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "AUT",
                                "display": "author",
                            }
                        ]
                    }
                ],
                "individual": composer,
            }
        ]
        if composer
        else None,
        location=[{"location": {"display": str(context["location"])}}] if context.get("location") else None,
        serviceProvider=facility,
    )


def _end(end: dict[str, Any] | None, ctx: Context) -> str | None:
    return fhir_datetime(str(end["value"]), ctx.tz) if end and end.get("value") else None


def _context_identifiers(composition: dict[str, Any], unmapped: list[Unmapped]) -> list[dict[str, Any]]:
    """Archetyped clusters in context.other_context: known ones add identifiers, others are reported."""
    identifiers = []
    items = ((composition.get("context") or {}).get("other_context") or {}).get("items") or []
    for index, item in enumerate(items):
        archetype = str(item.get("archetype_node_id", ""))
        if not archetype.startswith("openEHR-"):
            continue
        rule = CONTEXT_CLUSTERS.get(archetype)
        if rule is None:
            unmapped.append(Unmapped(archetype, f"/context/other_context/items[{archetype},{index}]"))
            continue
        value = text_of(element_value(item, rule[1]))
        if value:
            identifiers.append({"system": rule[0], "value": value})
    return identifiers


def composition_to_resources(
    composition: dict[str, Any],
    source: CompositionSource,
    tz: ZoneInfo,
    identifier_systems: dict[str, str],
    *,
    isolate: bool = False,
) -> Mapped:
    """Map a whole composition: Encounter (if it has a context) and every entry's resources.

    An entry its rule refuses raises MappingError, or with `isolate` is kept in `failed` and the other
    entries are mapped: the pipeline dead-letters the entry by name while the rest flows."""
    if composition.get("_type") != "COMPOSITION":
        raise MappingError(f"content is a {composition.get('_type')!r}, not a COMPOSITION")
    patient = patient_of(source, identifier_systems)
    context = composition.get("context")
    start = (context or {}).get("start_time")
    encounter_ref = f"Encounter/{entry_source_id(source.uid, '/context')}" if context else None
    ctx = Context(
        composition_uid=source.uid,
        version_uid=source.version_uid,
        patient_ref=f"Patient/{patient['id']}",
        encounter_ref=encounter_ref,
        tz=tz,
        start_time=fhir_datetime(str(start["value"]), tz) if start else None,
        persistent=local_code(composition.get("category")) == "431",
    )
    mapped = Mapped(patient=patient)
    if context:
        encounter = composition_to_encounter(composition, ctx)
        encounter["identifier"] += _context_identifiers(composition, mapped.unmapped)
        mapped.resources.append(encounter)
    for entry, path, where in located_entries(composition.get("content") or [], "", ""):
        mapper = ENTRY_MAPPERS.get(str(entry.get("archetype_node_id")))
        if mapper is None:
            mapped.unmapped.append(Unmapped(str(entry.get("archetype_node_id")), where))
            continue
        try:
            produced = mapper(entry, ctx, path)
        except MappingError as error:  # its reason names the entry by the stable path, node names and all
            reason = str(error).replace(path, where)
            if not isolate:
                raise MappingError(reason) from None
            mapped.failed.append(Failed(path, reason if where in reason else f"{where}: {reason}"))
            continue
        mapped.resources += produced
        mapped.entries[path] = [(r["resourceType"], r["id"]) for r in produced]
    return mapped
