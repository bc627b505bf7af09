"""A hospital's copy written to its FHIR server (writeback.method fhir, pipeline/backflow.py write_fhir_copy),
against the real FHIR server: a late or replayed record never replaces a copy made from a newer central version.

The copies are Basic resources (the guard does not depend on the type): central's capture reads every type
from this server's _history, and a QuestionnaireResponse tagged as central's would flow back as a decision.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

import orjson
import pytest

from pipeline.backflow import central_supersedes, write_fhir_copy, written_version
from pipeline.config import TargetEndpoint
from pipeline.errors import RejectedByTargetError
from pipeline.fhirclient import FhirClient
from pipeline.records import RoutedResource
from tests.casebuilder import hospital_copy, untagged_copy

from .conftest import Central

pytestmark = pytest.mark.integration


def _copy(central_id: str, version: int, decision: str | None) -> RoutedResource:
    return hospital_copy(central_id, version, decision, target="site-x")


def _write_all(stack: Central, copies: list[RoutedResource]) -> list[str]:
    async def run() -> list[str]:
        async with FhirClient(TargetEndpoint(fhir_base_url=stack.base_url)) as client:
            return [await write_fhir_copy(client, copy) for copy in copies]

    return asyncio.run(run())


def _there(stack: Central, copy: RoutedResource) -> dict[str, Any] | None:
    return stack.read("Basic", copy.target_id)


def test_a_late_version_never_replaces_a_newer_copy(stack: Central) -> None:
    central_id = f"wb-{uuid.uuid4().hex[:12]}"
    v1, v2, v3 = (_copy(central_id, n, f"decision {n}") for n in (1, 2, 3))

    outcomes = _write_all(stack, [v2, v1])  # version 1 arrives late (a replayed dead letter)

    assert outcomes[0].startswith("upserted")
    assert outcomes[1] == "superseded (version 2 there)"
    there = _there(stack, v2)
    assert there is not None and there["code"]["text"] == "decision 2" and written_version(there) == 2

    assert _write_all(stack, [v3, v3])[0].startswith("upserted")  # newer ones are written, again without harm
    there = _there(stack, v3)
    assert there is not None and there["code"]["text"] == "decision 3" and written_version(there) == 3


def test_a_late_deletion_leaves_a_newer_copy_and_a_deleted_copy_refuses_older_versions(stack: Central) -> None:
    central_id = f"wb-{uuid.uuid4().hex[:12]}"
    v3 = _copy(central_id, 3, "decision 3")
    deleted_at_2, deleted_at_4 = _copy(central_id, 2, None), _copy(central_id, 4, None)

    outcomes = _write_all(stack, [v3, deleted_at_2])

    assert outcomes[1] == "superseded (version 3 there)"
    assert _there(stack, v3) is not None
    assert _write_all(stack, [deleted_at_4, deleted_at_4]) == ["deleted", "absent"]
    assert _there(stack, v3) is None
    assert _write_all(stack, [v3]) == ["superseded (version 4 there)"]  # v3 read again: the copy stays deleted
    assert _there(stack, v3) is None

    v5 = _copy(central_id, 5, "decision 5")  # decided again after the deletion: written over the deleted copy
    assert _write_all(stack, [v5])[0].startswith("upserted")
    there = _there(stack, v5)
    assert there is not None and there["code"]["text"] == "decision 5"


def test_a_copy_without_a_version_is_replaced(stack: Central) -> None:
    """A copy written before versions were tagged (or by hand) holds no version: any version replaces it."""
    central_id = f"wb-{uuid.uuid4().hex[:12]}"
    v1 = _copy(central_id, 1, "decision 1")
    untagged = untagged_copy(v1)
    stack.send(untagged, method="PUT")

    assert _write_all(stack, [v1])[0].startswith("upserted")
    there = _there(stack, v1)
    assert there is not None and there["code"]["text"] == "decision 1"


def test_a_copy_the_server_refuses_is_dead_lettered_with_the_server_s_reason(stack: Central) -> None:
    """A create-only write refused while nothing is there is not a race: the copy is written plainly, and the
    server's own answer (here a 400: the body's id is not the one in the URL) is what the dead letter says."""
    copy = _copy(f"wb-{uuid.uuid4().hex[:12]}", 1, "decision 1")
    assert copy.resource is not None
    broken = orjson.loads(copy.resource)
    broken["id"] = f"other-{uuid.uuid4().hex[:12]}"
    with pytest.raises(RejectedByTargetError) as refused:
        _write_all(stack, [dataclasses.replace(copy, resource=orjson.dumps(broken).decode())])
    assert refused.value.status == 400 and refused.value.error_class == "rejected_by_target"
    assert _there(stack, copy) is None


def test_a_deleted_copy_refuses_the_version_its_deletion_carries(stack: Central) -> None:
    """A central deletion carries the version it deleted (its `before`, pipeline/capture.py): that version read
    again afterwards (a restart, a replayed dead letter) finds the copy deleted at it and leaves it deleted."""
    central_id = f"wb-{uuid.uuid4().hex[:12]}"
    v1, deleted = _copy(central_id, 1, "decision 1"), _copy(central_id, 1, None)

    outcomes = _write_all(stack, [v1, deleted, v1])

    assert outcomes[1:] == ["deleted", "superseded (deleted at version 1 there)"]
    assert _there(stack, v1) is None
    assert _write_all(stack, [_copy(central_id, 2, "decision 2")])[0].startswith("upserted")  # decided again


def test_only_a_version_still_current_at_central_is_written_back(stack: Central) -> None:
    """A record read again or replayed after central moved on: a newer version has its own record, and a
    decision deleted at central must not reach a hospital that never had its copy (nothing there says it was
    deleted). A deletion always goes on."""
    central_id = f"wb-{uuid.uuid4().hex[:12]}"
    for text in ("decision 1", "decision 2"):
        stack.send({"resourceType": "Basic", "id": central_id, "code": {"text": text}}, method="PUT")
    v1, v2 = _copy(central_id, 1, "decision 1"), _copy(central_id, 2, "decision 2")

    async def run() -> list[str | None]:
        async with FhirClient(TargetEndpoint(fhir_base_url=stack.base_url)) as central:
            before = [await central_supersedes(central, copy) for copy in (v1, v2)]
            await central.delete("Basic", central_id)
            after = [
                await central_supersedes(central, v2),
                await central_supersedes(central, _copy(central_id, 2, None)),
            ]
            never = await central_supersedes(central, _copy(f"wb-{uuid.uuid4().hex[:12]}", 1, "decision 1"))
            return [*before, *after, never]

    assert asyncio.run(run()) == [
        "superseded (version 2 at central)",
        None,
        "superseded (deleted at central)",
        None,
        "superseded (no longer at central)",
    ]
