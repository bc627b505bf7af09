"""A central edit since our last write: the hospital's change is kept for review, not written over it;
a reviewer's decision (`cdrsync conflicts resolve`) then takes effect, audited."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from dataclasses import replace
from typing import Any

import orjson
import pytest

from pipeline.cli import main as cdrsync
from pipeline.config import Config, TargetEndpoint
from pipeline.errors import RetryableError, VersionConflictError
from pipeline.fhirclient import FhirClient
from pipeline.records import RoutedResource, canonical_hash
from pipeline.sink import AWAIT_EXACT_SECONDS, write_record
from pipeline.tap import tap
from tests.casebuilder import observation_for, patient, routed_record
from tests.integration.conftest import SETTINGS, Central, SiteDatabase, Worker, audit_rows, central_id, wait_for

pytestmark = pytest.mark.integration


def _put(stack: Central, resource: dict[str, Any]) -> int:
    """A clinician's edit at the central CDR (the tumour-board application, say): an ordinary FHIR update."""
    request = urllib.request.Request(
        f"{stack.base_url}/{resource['resourceType']}/{resource['id']}",
        data=json.dumps(resource).encode(),
        method="PUT",
        headers={"Content-Type": "application/fhir+json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(response.status)


def _conflicts(config: Config, target_ref: str) -> list[dict[str, Any]]:
    items = tap(SETTINGS.kafka_bootstrap, config.topics.name("conflicts"), idle_seconds=2)
    return [i for i in items if isinstance(i["value"], dict) and i["value"].get("target_ref") == target_ref]


def _conflict_ids(capsys: pytest.CaptureFixture[str], target_ref: str) -> list[str]:
    assert cdrsync(["conflicts", "list", "--json"]) == 0
    lines = [orjson.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    return [line["id"] for line in lines if line["target_ref"] == target_ref]


def _value(stack: Central, target_id: str) -> float:
    resource = stack.read("Observation", target_id)
    assert resource is not None
    return float(resource["valueQuantity"]["value"])


def _edited_then_changed_at_the_hospital(
    stack: Central, site_a: SiteDatabase, name: str, central: float, hospital: float
) -> tuple[dict[str, Any], str]:
    """Written to central, edited there, then changed at the hospital: (the hospital's row, central id)."""
    person = patient(name)
    weight = observation_for(name, person["id"], 1, 70.0)
    site_a.upsert_many([person, weight])
    target_id = central_id("Observation", weight["id"])
    written = wait_for(lambda: stack.read("Observation", target_id), timeout=120, what="the observation")
    assert _put(stack, {**written, "valueQuantity": {**written["valueQuantity"], "value": central}}) == 200
    changed = {**weight, "valueQuantity": {**weight["valueQuantity"], "value": hospital}}
    site_a.upsert(changed)
    return changed, target_id


def _open_conflict(
    stack: Central,
    site_a: SiteDatabase,
    config: Config,
    capsys: pytest.CaptureFixture[str],
    name: str,
    central: float,
    hospital: float,
) -> tuple[dict[str, Any], str, str, str]:
    """A conflict as `cdrsync conflicts list` shows it: (the hospital's row, central id, reference, conflict id)."""
    weight, target_id = _edited_then_changed_at_the_hospital(stack, site_a, name, central, hospital)
    ref = f"Observation/{target_id}"
    wait_for(lambda: _conflicts(config, ref), timeout=120, what="the conflict record")
    [conflict_id] = _conflict_ids(capsys, ref)
    return weight, target_id, ref, conflict_id


def test_central_edit_then_hospital_update_gives_a_conflict_and_no_overwrite(
    worker: Worker, stack: Central, site_a: SiteDatabase, run_id: str, config: Config
) -> None:
    before = worker.metric("cdrsync_conflicts_total", site="site-a", resource_type="Observation")
    weight, target_id = _edited_then_changed_at_the_hospital(stack, site_a, f"{run_id}-conf", 72.5, 69.0)
    ref = f"Observation/{target_id}"

    [item] = wait_for(lambda: _conflicts(config, ref), timeout=120, what="the conflict record")
    record = item["value"]
    assert record["incoming"]["valueQuantity"]["value"] == 69.0  # the hospital's version
    assert record["current"]["valueQuantity"]["value"] == 72.5  # the central version it would have overwritten
    assert int(record["current_version"]) == int(record["our_last_version"]) + 1
    assert record["site"] == "site-a" and record["source_id"] == weight["id"]
    assert _value(stack, target_id) == 72.5
    assert worker.metric("cdrsync_conflicts_total", site="site-a", resource_type="Observation") == before + 1
    # The audit row carries the SHA-256 of the version that was not applied.
    steps = wait_for(
        lambda: [r for r in audit_rows(weight["id"]) if r[0] == "conflict"], timeout=60, what="the conflict audit row"
    )
    assert steps[-1][2] == record["content_hash"] == canonical_hash(record["incoming"])
    # A later, unrelated hospital change still flows.
    later = observation_for(f"{run_id}-conf", weight["subject"]["reference"].split("/")[-1], 2, 71.0)
    site_a.upsert(later)
    wait_for(
        lambda: stack.read("Observation", central_id("Observation", later["id"])),
        timeout=120,
        what="a later observation",
    )
    assert _value(stack, target_id) == 72.5  # still not overwritten
    # The same row changed again before anyone decided: a second conflict, never a write over the clinician's.
    site_a.upsert({**weight, "valueQuantity": {**weight["valueQuantity"], "value": 68.0}})

    def two_conflicts() -> list[dict[str, Any]]:
        items = _conflicts(config, ref)
        return items if len(items) >= 2 else []

    [_, second] = wait_for(two_conflicts, timeout=120, what="a second conflict record")
    assert second["value"]["incoming"]["valueQuantity"]["value"] == 68.0
    assert second["value"]["current"]["valueQuantity"]["value"] == 72.5
    assert _value(stack, target_id) == 72.5


def test_a_reviewer_takes_the_hospitals_version(
    worker: Worker,
    stack: Central,
    site_a: SiteDatabase,
    run_id: str,
    config: Config,
    capsys: pytest.CaptureFixture[str],
) -> None:
    weight, target_id, ref, conflict_id = _open_conflict(stack, site_a, config, capsys, f"{run_id}-take", 80.0, 66.0)

    assert cdrsync(["conflicts", "resolve", conflict_id, "--take-incoming", "--reason", "tb review"]) == 0
    assert "dry run" in capsys.readouterr().out
    assert _value(stack, target_id) == 80.0  # a dry run changes nothing
    assert cdrsync(["conflicts", "resolve", conflict_id, "--take-incoming", "--reason", "tb review", "--execute"]) == 0
    assert "1 conflicts resolved" in capsys.readouterr().out

    wait_for(lambda: _value(stack, target_id) == 66.0, timeout=120, what="the hospital's version at central")
    assert _conflict_ids(capsys, ref) == []  # no longer open
    rows = wait_for(
        lambda: [r for r in audit_rows(weight["id"]) if r[0] == "conflict_resolved"], timeout=60, what="the audit row"
    )
    assert rows[-1][1] == target_id
    # The next change from the hospital applies over the version just written, without a conflict.
    site_a.upsert({**weight, "valueQuantity": {**weight["valueQuantity"], "value": 65.0}})
    wait_for(lambda: _value(stack, target_id) == 65.0, timeout=120, what="the next hospital change")
    assert len(_conflicts(config, ref)) == 1


def test_a_reviewer_keeps_the_central_version(
    worker: Worker,
    stack: Central,
    site_a: SiteDatabase,
    run_id: str,
    config: Config,
    capsys: pytest.CaptureFixture[str],
) -> None:
    weight, target_id, ref, conflict_id = _open_conflict(stack, site_a, config, capsys, f"{run_id}-keep", 90.0, 55.0)

    assert cdrsync(["conflicts", "resolve", conflict_id, "--keep-target", "--reason", "central", "--execute"]) == 0
    capsys.readouterr()
    # The central version stays; the hospital's next change is new information and is written over it.
    site_a.upsert({**weight, "valueQuantity": {**weight["valueQuantity"], "value": 56.0}})
    wait_for(lambda: _value(stack, target_id) == 56.0, timeout=120, what="the next hospital change")
    assert len(_conflicts(config, ref)) == 1  # and it was no conflict


def _routed(run_id: str, version: int, value: float, *, name: str = "replay", op: str = "UPDATE") -> RoutedResource:
    body = {
        "resourceType": "Observation",
        "id": f"{run_id}-{name}",
        "status": "final",
        "code": {"text": "weight"},
        "valueQuantity": {"value": value, "unit": "kg"},
    }
    return routed_record(
        body, patient_key=body["id"], op=op, origin=("t", 0, version), source_version=version, source_lsn=version * 100
    )


def _history_values(stack: Central, target_id: str) -> list[float | None]:
    """The values of every version at the target, oldest first (None for a deletion)."""
    return [r["valueQuantity"]["value"] if r is not None else None for r in stack.history("Observation", target_id)]


def _central(config: Config, first_write: str) -> TargetEndpoint:
    """The central target, with the given way of writing a resource the sink holds no version of."""
    return config.target("central").model_copy(update={"first_write": first_write})


FIRST_WRITES = pytest.mark.parametrize("first_write", ["guarded", "read"])


@FIRST_WRITES
def test_changes_read_again_after_a_crash_never_put_older_content_back(
    stack: Central, run_id: str, config: Config, first_write: str
) -> None:
    """The sink wrote three versions, then died before its table kept any of it: the restart reads all
    three again. Whether the table remembers nothing or a stale version, the target's history goes forward."""

    async def scenario() -> None:
        async with FhirClient(_central(config, first_write)) as client:
            for lost in ("nothing", "first version"):
                name = f"lost-{lost.split()[0]}-{first_write}"
                versions: dict[str, dict[str, Any]] = {}
                remembered: dict[str, dict[str, Any]] = {}
                for n, value in enumerate((10.0, 11.0, 12.0), start=1):
                    await write_record(client, _routed(run_id, n, value, name=name), versions)
                    if n == 1 and lost == "first version":
                        remembered = dict(versions)
                for n, value in enumerate((10.0, 11.0, 12.0), start=1):  # the restart, over what the table kept
                    outcome = await write_record(client, _routed(run_id, n, value, name=name), remembered)
                    assert outcome.status in (200, 304), (lost, n, outcome)
                assert _history_values(stack, f"{run_id}-{name}") == [10.0, 11.0, 12.0], lost

            # A deletion read again after the row came back: the resource stays.
            name = f"lost-delete-{first_write}"
            versions = {}
            await write_record(client, _routed(run_id, 1, 20.0, name=name), versions)
            await write_record(client, _routed(run_id, 2, 20.0, name=name, op="DELETE"), versions)
            await write_record(client, _routed(run_id, 3, 21.0, name=name, op="CREATE"), versions)
            replayed = await write_record(client, _routed(run_id, 2, 20.0, name=name, op="DELETE"), {})
            assert replayed.status == 304
            assert _history_values(stack, f"{run_id}-{name}") == [20.0, None, 21.0]

    asyncio.run(scenario())


@FIRST_WRITES
def test_a_change_older_than_a_deletion_never_brings_the_resource_back(
    stack: Central, run_id: str, config: Config, first_write: str
) -> None:
    """The hospital deleted a resource; an older change of it reaches a sink that holds no version of it (another
    partition's, after an identity review moved the patient, meeting a re-send of Debezium's): it stays deleted.
    The hospital's next change of that row brings it back, as it should."""
    name = f"deleted-{first_write}"

    async def scenario() -> None:
        async with FhirClient(_central(config, first_write)) as client:
            versions: dict[str, dict[str, Any]] = {}
            await write_record(client, _routed(run_id, 1, 30.0, name=name), versions)
            await write_record(client, _routed(run_id, 2, 31.0, name=name), versions)
            await write_record(client, _routed(run_id, 3, 31.0, name=name, op="DELETE"), versions)
            for n, value in ((2, 31.0), (1, 30.0)):
                outcome = await write_record(client, _routed(run_id, n, value, name=name), {})
                assert outcome.status == 304, (n, outcome)
            assert stack.read("Observation", f"{run_id}-{name}") is None
            assert _history_values(stack, f"{run_id}-{name}") == [30.0, 31.0, None]
            created = await write_record(client, _routed(run_id, 4, 32.0, name=name), {})
            assert created.status in (200, 201)
            # Edited at the centre before the hospital deleted it: its mark still says which change it held.
            edited = f"{name}-edited"
            await write_record(client, _routed(run_id, 1, 40.0, name=edited), {})
            body = stack.read("Observation", f"{run_id}-{edited}")
            _put(stack, {**body, "note": [{"text": "checked at the tumour board"}]})
            await write_record(client, _routed(run_id, 2, 40.0, name=edited, op="DELETE"), {})
            outcome = await write_record(client, _routed(run_id, 1, 40.0, name=edited), {})
            assert outcome.status == 304 and stack.read("Observation", f"{run_id}-{edited}") is None

    asyncio.run(scenario())
    assert _value(stack, f"{run_id}-{name}") == 32.0


@FIRST_WRITES
def test_a_delete_after_an_identity_move_waits_for_what_the_previous_patient_s_sink_still_owes(
    stack: Central, run_id: str, config: Config, first_write: str
) -> None:
    """An identity move: the resource's create and update were released in the previous Patient's partition, whose
    sink lags behind (a back-load); the hospital's delete, released in the new Patient's partition, names the
    update's position (`awaits_lsn`). Deleting before that sink wrote it would delete nothing, and the late
    write would bring the resource back: the delete is retried until the target holds the update."""
    name = f"awaited-{first_write}"

    async def scenario() -> None:
        async with FhirClient(_central(config, first_write)) as client:
            previous: dict[str, dict[str, Any]] = {}  # the previous Patient's sink's table
            now_ms = int(time.time() * 1000)
            delete = replace(_routed(run_id, 3, 0.0, name=name, op="DELETE"), awaits_lsn=200, captured_ms=now_ms)
            with pytest.raises(RetryableError, match="LSN 200"):
                await write_record(client, delete, {})
            status, _ = stack.get(f"Observation/{run_id}-{name}/_history")
            assert status == 404  # nothing written, nothing deleted
            await write_record(client, _routed(run_id, 1, 50.0, name=name), previous)
            with pytest.raises(RetryableError):  # the create is there, the update not yet
                await write_record(client, delete, {})
            await write_record(client, _routed(run_id, 2, 51.0, name=name), previous)
            await write_record(client, delete, {})
            assert _history_values(stack, f"{run_id}-{name}") == [50.0, 51.0, None]
            again = await write_record(client, delete, {})  # retried once more after a crash: gone is gone
            assert again.status in (200, 204, 304)

            # The new Patient's sink went first with a later change, then the delete: the previous one's late
            # update (over the version it wrote) leaves the resource deleted.
            late = f"{name}-late"
            await write_record(client, _routed(run_id, 1, 60.0, name=late), previous)
            ours: dict[str, dict[str, Any]] = {}
            await write_record(client, _routed(run_id, 3, 62.0, name=late), ours)
            gone = replace(_routed(run_id, 4, 0.0, name=late, op="DELETE"), awaits_lsn=200, captured_ms=now_ms)
            await write_record(client, gone, ours)
            outcome = await write_record(client, _routed(run_id, 2, 61.0, name=late), previous)
            assert outcome.status == 304
            assert _history_values(stack, f"{run_id}-{late}") == [60.0, 62.0, None]

            # The awaited update never came (the previous Patient's sink dead-lettered it): half an hour after the
            # hospital deleted it, the version there will do. Nothing there never does.
            lost, never = f"{name}-lost", f"{name}-never"
            await write_record(client, _routed(run_id, 1, 70.0, name=lost), previous)
            fresh = replace(_routed(run_id, 3, 0.0, name=lost, op="DELETE"), awaits_lsn=200, captured_ms=now_ms)
            with pytest.raises(RetryableError):
                await write_record(client, fresh, {})
            long_ago = now_ms - AWAIT_EXACT_SECONDS * 1000 - 1000
            await write_record(client, replace(fresh, captured_ms=long_ago), {})
            assert _history_values(stack, f"{run_id}-{lost}") == [70.0, None]
            nothing = replace(_routed(run_id, 3, 0.0, name=never, op="DELETE"), awaits_lsn=200, captured_ms=long_ago)
            with pytest.raises(RetryableError):
                await write_record(client, nothing, {})

    asyncio.run(scenario())


@FIRST_WRITES
def test_a_delete_of_resources_in_a_reference_cycle_waits_for_each_one_the_previous_patient_s_sink_owes(
    stack: Central, run_id: str, config: Config, first_write: str
) -> None:
    """Resources naming each other are deleted in one transaction (`delete_with`). After an identity move, the
    previous Patient's sink may still owe the write of any of them, not only the first: the delete waits for
    each (`awaits_with`), and deletes none of them before."""
    head, other = f"cycle-{first_write}-a", f"cycle-{first_write}-b"
    other_ref = f"Observation/{run_id}-{other}"

    async def scenario() -> None:
        async with FhirClient(_central(config, first_write)) as client:
            previous: dict[str, dict[str, Any]] = {}  # the previous Patient's sink's table
            await write_record(client, _routed(run_id, 1, 50.0, name=head), previous)
            delete = replace(
                _routed(run_id, 3, 0.0, name=head, op="DELETE"),
                awaits_lsn=100,
                captured_ms=int(time.time() * 1000),
                delete_with=[other_ref],
                awaits_with=[{"ref": other_ref, "row": f"site-a|{run_id}-{other}", "lsn": 200}],
            )
            with pytest.raises(RetryableError, match=f"{other_ref}: its change at source LSN 200"):
                await write_record(client, delete, {})  # the other one is not there yet
            await write_record(client, _routed(run_id, 1, 70.0, name=other), previous)
            with pytest.raises(RetryableError, match=other_ref):  # there, but not the change awaited
                await write_record(client, delete, {})
            assert _history_values(stack, f"{run_id}-{head}") == [50.0]  # nothing deleted meanwhile
            await write_record(client, _routed(run_id, 2, 71.0, name=other), previous)
            await write_record(client, delete, {})
            assert _history_values(stack, f"{run_id}-{head}") == [50.0, None]
            assert _history_values(stack, f"{run_id}-{other}") == [70.0, 71.0, None]

    asyncio.run(scenario())


@FIRST_WRITES
def test_our_own_writes_that_the_sink_table_lost_are_not_conflicts(
    stack: Central, run_id: str, config: Config, first_write: str
) -> None:
    name = f"replay-{first_write}"
    ref = f"Observation/{run_id}-{name}"

    async def scenario() -> None:
        async with FhirClient(_central(config, first_write)) as client:
            versions: dict[str, dict[str, Any]] = {}
            await write_record(client, _routed(run_id, 1, 60.0, name=name), versions)
            remembered = dict(versions)  # the table as it was when the worker died ...
            # ... after this write reached the target
            await write_record(client, _routed(run_id, 2, 61.0, name=name), versions)
            # the restart replays it
            replayed = await write_record(client, _routed(run_id, 2, 61.0, name=name), dict(remembered))
            assert replayed.version_id == versions[ref]["version"]
            # The next change over the stale version: the target holds an untouched write of ours, not an edit.
            third = await write_record(client, _routed(run_id, 3, 62.0, name=name), dict(remembered))
            assert int(third.version_id or 0) == int(versions[ref]["version"]) + 1
            # An older change read again after that: the later version of the row stays.
            older = await write_record(client, _routed(run_id, 2, 61.0, name=name), dict(remembered))
            assert (older.status, older.version_id) == (304, third.version_id)
            assert _value(stack, f"{run_id}-{name}") == 62.0
            # An edit at the target is a conflict, even for a version the sink knows.
            current = stack.read("Observation", f"{run_id}-{name}")
            assert current is not None
            assert _put(stack, {**current, "valueQuantity": {**current["valueQuantity"], "value": 99.0}}) == 200
            with pytest.raises(VersionConflictError):
                await write_record(client, _routed(run_id, 4, 63.0, name=name), {ref: {"version": third.version_id}})

    asyncio.run(scenario())
    assert _value(stack, f"{run_id}-{name}") == 99.0


@FIRST_WRITES
def test_a_first_write_creates_but_never_overwrites_what_cdrsync_did_not_write(
    stack: Central, run_id: str, config: Config, first_write: str
) -> None:
    """A resource the sink holds no version of: created when the target has none, created again when it was
    deleted there, and a conflict (nothing written) when someone else put a resource at its id first."""
    fresh, deleted, foreign = (f"first-{kind}-{first_write}" for kind in ("fresh", "deleted", "foreign"))

    async def scenario() -> None:
        async with FhirClient(_central(config, first_write)) as client:
            created = await write_record(client, _routed(run_id, 1, 70.0, name=fresh), {})
            assert (created.status, created.version_id) == (201, "1")

            await write_record(client, _routed(run_id, 1, 71.0, name=deleted), {})
            await write_record(client, _routed(run_id, 2, 71.0, name=deleted, op="DELETE"), {})
            again = await write_record(client, _routed(run_id, 3, 72.0, name=deleted, op="CREATE"), {})
            assert again.version_id == "3"

            theirs = {**orjson.loads(_routed(run_id, 1, 80.0, name=foreign).resource or "{}"), "meta": {}}
            theirs["valueQuantity"]["value"] = 99.0
            assert _put(stack, theirs) == 201  # a clinician's resource, at the id cdrsync would use
            with pytest.raises(VersionConflictError):
                await write_record(client, _routed(run_id, 1, 80.0, name=foreign), {})

    asyncio.run(scenario())
    assert _history_values(stack, f"{run_id}-{fresh}") == [70.0]
    assert _history_values(stack, f"{run_id}-{deleted}") == [71.0, None, 72.0]
    assert _history_values(stack, f"{run_id}-{foreign}") == [99.0]
