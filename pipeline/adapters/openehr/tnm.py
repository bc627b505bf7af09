"""TNM staging CLUSTERs inside a problem/diagnosis → Observations (T, N, M, stage group) + Condition.stage.

At-codes of CLUSTER.tnm.v1 (clinical) and CLUSTER.tnm-pathological.v1 from the archetypes
(CKM 1013.1.2413 and 1013.1.4191): T at0003(.1), N at0004(.1), M at0005(.1), stage grouping at0031(.1).
LOINC codes of the TNM categories and stage groups as the mCODE/MII oncology profiles use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .context import Context
from .rm import coded_to_codeable, element_value, find_clusters

__all__ = ["TNM_RULES", "tnm_to_stage"]

LOINC = "http://loinc.org"


@dataclass(frozen=True)
class TnmRule:
    """Where one TNM archetype keeps T, N, M and the stage group, and their LOINC codes."""

    elements: tuple[tuple[str, str, str, str], ...]  # (key, at-code, LOINC, display)
    stage: tuple[str, str, str]  # (at-code, LOINC, display)


TNM_RULES = {
    "openEHR-EHR-CLUSTER.tnm.v1": TnmRule(
        (
            ("T", "at0003", "21905-5", "Primary tumor.clinical [Class] Cancer"),
            ("N", "at0004", "21906-3", "Regional lymph nodes.clinical [Class] Cancer"),
            ("M", "at0005", "21907-1", "Distant metastases.clinical [Class] Cancer"),
        ),
        ("at0031", "21908-9", "Stage group.clinical Cancer"),
    ),
    "openEHR-EHR-CLUSTER.tnm-pathological.v1": TnmRule(
        (
            ("T", "at0003.1", "21899-0", "Primary tumor.pathology Cancer"),
            ("N", "at0004.1", "21900-6", "Regional lymph nodes.pathology Cancer"),
            ("M", "at0005.1", "21901-4", "Distant metastases.pathology Cancer"),
        ),
        ("at0031.1", "21902-2", "Stage group.pathology Cancer"),
    ),
}


def _observation(
    ctx: Context, path: str, loinc: str, display: str, value: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    return ctx.resource(
        "Observation",
        path,
        status="final",
        code={"coding": [{"system": LOINC, "code": loinc, "display": display}]},
        subject=ctx.subject,
        encounter=ctx.encounter,
        effectiveDateTime=ctx.start_time,
        valueCodeableConcept=value,
        **extra,
    )


def tnm_to_stage(data: Any, ctx: Context, path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(Condition.stage entries, Observations) for every TNM cluster below a problem/diagnosis."""
    stages, observations = [], []
    for archetype, rule in TNM_RULES.items():
        for index, cluster in enumerate(find_clusters(data, archetype)):
            base = f"{path}/tnm[{archetype},{index}]"
            members = []
            for key, node, loinc, display in rule.elements:
                value = coded_to_codeable(element_value(cluster, node), archetype)
                if value is not None:
                    members.append(_observation(ctx, f"{base}/{key}", loinc, display, value))
            node, loinc, display = rule.stage
            group = coded_to_codeable(element_value(cluster, node), archetype)
            refs = [{"reference": f"Observation/{o['id']}"} for o in members]
            if group is not None:
                summary = _observation(ctx, f"{base}/stage", loinc, display, group, hasMember=refs)
                members.append(summary)
                refs = [{"reference": f"Observation/{summary['id']}"}]
            stage = {
                "summary": group,
                "assessment": refs,
                "type": {"coding": [{"system": LOINC, "code": loinc, "display": display}]},
            }
            stages.append({k: v for k, v in stage.items() if v})
            observations += members
    return stages, observations
