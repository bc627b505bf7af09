"""Demo data of the openEHR hospital (site-d) and the HL7 v2 hospital (site-c), and what it maps to.

Both treat site-a's ADT patient too (same insurance number), so the demo shows one central Patient
fed by a FHIR CDR, an openEHR CDR and an HL7 v2 HIS; site-c also raises that patient's tumour-board flag.
"""

from __future__ import annotations

from typing import Any

import orjson
import psycopg

from .adapters.hl7v2 import Hl7Context, message_to_resources
from .adapters.openehr import CompositionSource, composition_to_resources
from .config import SiteConfig
from .demo import DEMO_SHARED_SYSTEM, FIXTURES, SourceRow, bundle_rows, demo_kvnr
from .errors import MappingError
from .identity import shared_identifier

__all__ = [
    "adapter_source_rows",
    "demo_compositions",
    "demo_messages",
    "demo_source_keys",
    "write_compositions",
    "write_messages",
]

_ROOT = FIXTURES.parent
OPENEHR_FIXTURES = _ROOT / "openehr"
HL7V2_FIXTURES = _ROOT / "hl7v2"
DEMO_COMPOSITIONS = ["laboratory_report", "demo_vitals_352", "gecco_laborbefund", "virology_finding_with_specimen"]
DEMO_EHR_ID = "5b0c4f7e-2f9a-4d8e-9a51-7c1c2f0d3e10"


def shared_person_kvnr() -> str:
    """The insurance number of site-a's ADT patient, the person every demo hospital treats."""
    patient = bundle_rows(FIXTURES / "ADT-A01-01.json", ["Patient"])[0]
    value = shared_identifier(patient.content, DEMO_SHARED_SYSTEM)
    assert value is not None
    return value


def demo_compositions() -> list[tuple[CompositionSource, dict[str, Any]]]:
    """The openEHR hospital's compositions, all in the EHR of the shared person."""
    kvnr = shared_person_kvnr()
    return [
        (
            CompositionSource(f"demo-{name}", "site-d.demo", 1, DEMO_EHR_ID, kvnr, "kvid-10"),
            orjson.loads((OPENEHR_FIXTURES / f"{name}.json").read_bytes()),
        )
        for name in DEMO_COMPOSITIONS
    ]


def demo_messages() -> list[str]:
    """The HL7 v2 hospital's inbox: the shared lab message (its patient given a demo insurance number) and
    an ADT^A08 for the shared person carrying the tumour-board flag (ZTB)."""
    lab = (HL7V2_FIXTURES / "LAB-ORU-1.hl7").read_bytes().decode("utf-8")
    segments = [line for line in lab.replace("\r\n", "\n").replace("\r", "\n").split("\n") if line.strip()]
    pid = next(i for i, s in enumerate(segments) if s.startswith("PID|"))
    fields = segments[pid].split("|")
    fields[3] += f"~{demo_kvnr('site-c|' + fields[3].split('^')[0])}^^^KVK^NI"
    segments[pid] = "|".join(fields)
    kvnr = shared_person_kvnr()
    flag = [
        "MSH|^~\\&|HIS|SITEC|CDRSYNC|CENTRAL|20240301101500+0100||ADT^A08|DEMO-ZTB-1|P|2.5",
        "EVN|A08|20240301101500+0100",
        f"PID|1||c-20331^^^SITEC^MR~{kvnr}^^^KVK^NI||EVERYMAN^ADAM^A||19880818|M",
        "PV1|1|I|ONK^12^3||||0815^Doc^Dora||||||||||||C-V-4711^^^SITEC^VN|||||||||||||||||||||||||20240301090000+0100",
        "ZTB|1|tumorboard^Tumour board^urn:cdrsync:flag|A|20240301100000+0100",
    ]
    return ["\r".join(segments) + "\r", "\r".join(flag) + "\r"]


def write_compositions(dsn: str, compositions: list[tuple[CompositionSource, dict[str, Any]]]) -> int:
    """Insert or replace compositions (a new version when the uid exists) in openehr.composition."""
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        for source, content in compositions:
            cur.execute(
                "INSERT INTO openehr.composition (uid, system_id, version, ehr_id, subject_id, subject_namespace, "
                "content) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (uid) DO UPDATE SET "
                "content = EXCLUDED.content, version = openehr.composition.version + 1, updated_at = now()",
                (
                    source.uid,
                    source.system_id,
                    source.version,
                    source.ehr_id,
                    source.subject_id,
                    source.subject_namespace,
                    orjson.dumps(content).decode(),
                ),
            )
    return len(compositions)


def write_messages(dsn: str, messages: list[str]) -> int:
    """Append messages to the hl7v2.message inbox, as an interface engine would."""
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        for raw in messages:
            msh = raw.split("\r", 1)[0].split("|")
            cur.execute(
                "INSERT INTO hl7v2.message (control_id, message_type, message) VALUES (%s, %s, %s)",
                (msh[9], msh[8], raw),
            )
    return len(messages)


def demo_source_keys(site: SiteConfig) -> list[str]:
    """The rows `demo load` writes to an adapter hospital: composition uids, or message control ids."""
    if site.adapter == "openehr":
        return [source.uid for source, _ in demo_compositions()]
    if site.adapter == "hl7v2":
        return [raw.split("\r", 1)[0].split("|")[9] for raw in demo_messages()]
    return []


def adapter_source_rows(site: SiteConfig, dsn: str, only: list[str] | None = None) -> list[SourceRow]:
    """What an openehr or hl7v2 site's rows map to, as (type, id, commit time, Patient content) rows.

    `only`: just these compositions (uids) or messages (control ids).
    """
    out: list[SourceRow] = []
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        if site.adapter == "openehr":
            cur.execute(
                "SELECT uid, system_id, version, ehr_id, subject_id, subject_namespace, content, "
                "extract(epoch from updated_at) FROM openehr.composition WHERE %(all)s OR uid = ANY(%(only)s)",
                {"all": only is None, "only": only or []},
            )
            for uid, system_id, version, ehr_id, subject, namespace, content, committed in cur.fetchall():
                source = CompositionSource(uid, system_id, version, ehr_id, subject, namespace)
                mapped = composition_to_resources(content, source, site.zone, site.identifier_systems)
                out += _rows(site, [mapped.patient, *mapped.resources], float(committed))
        elif site.adapter == "hl7v2":
            cur.execute(
                "SELECT message, extract(epoch from updated_at) FROM hl7v2.message "
                "WHERE %(all)s OR control_id = ANY(%(only)s)",
                {"all": only is None, "only": only or []},
            )
            context = Hl7Context(site.site, site.zone, site.identifier_systems)
            for raw, committed in cur.fetchall():
                try:
                    resources = message_to_resources(raw, context).resources
                except MappingError:
                    continue  # a rejected message maps to nothing; it is in the dead-letter topic
                out += _rows(site, resources, float(committed))
    return out


def _rows(site: SiteConfig, resources: list[dict[str, Any]], committed: float) -> list[SourceRow]:
    return [
        (r["resourceType"], r["id"], committed, r if r["resourceType"] == "Patient" else None)
        for r in resources
        if r["resourceType"] in site.resource_types
    ]
