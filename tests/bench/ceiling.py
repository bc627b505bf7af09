"""The FHIR server's own ceiling for R2: how fast it stores the same resources when nothing else is asked.

R2 divides the pipeline's rate into the server by the naive loop's. Both are bounded by what the server
itself can store per second on this machine, so this measures that bound in the same run: the R2 data set
under fresh ids, mapped beforehand with the project's own functions (as the naive loop maps it) and put in
an order where every reference is written before the resource that holds it, then sent as FHIR
transaction bundles of PUTs, one bundle at a time, over one kept-alive connection. No Kafka, no reads
before writing, no Provenance, no audit: only the writes. The rate divided by the naive loop's is the
largest R2 a writer of such bundles could reach here.
"""

from __future__ import annotations

import http.client
import time
import urllib.parse
from pathlib import Path
from typing import Any

import orjson

from pipeline.config import load_config
from pipeline.identity import IdentityState, resolve_identity
from pipeline.normalize import SourcePosition, normalize_change
from pipeline.records import NormalizedResource, RoutedResource

from .context import Bench
from .dataset import Dataset, expected_ref
from .naive import NaiveResult, _Writer
from .offsets import read_range
from .throughput import Throughput, _all_stored

__all__ = ["in_write_order", "run_ceiling", "transaction"]


class _Recorder:
    """Stands in for the naive loop's HTTP target: notes the order the loop would write in."""

    def __init__(self) -> None:
        self.order: list[str] = []

    def send(self, method: str, ref: str, body: bytes | None) -> int:
        self.order.append(ref)
        return 200


def in_write_order(bench: Bench, start: dict[int, int], end: dict[int, int]) -> list[RoutedResource]:
    """The source records from `start` to `end`, mapped as the naive loop maps them, references first."""
    site = load_config(Path(bench.root)).sites[bench.site.site]
    state = IdentityState({}, {})
    recorder = _Recorder()
    writer = _Writer(recorder, NaiveResult())  # type: ignore[arg-type]  # the recorder has its one method
    routed: dict[str, RoutedResource] = {}
    group, bootstrap = f"bench-{bench.run_id}-ceiling", bench.settings.kafka_bootstrap
    with read_range(bootstrap, bench.source_topic, start, end, group, timeout=1.0) as records:
        for message in records:
            where = SourcePosition(bench.source_topic, message.partition() or 0, message.offset() or 0)
            record = normalize_change(site, message.value(), where)
            if isinstance(record, NormalizedResource):
                for item in resolve_identity(state, record, site).routed:
                    routed[item.target_ref] = item
                    writer.offer(item)
    if writer.deferred:
        raise RuntimeError(f"ceiling: {writer.deferred} resources reference something the data set lacks")
    return [routed[ref] for ref in recorder.order]


def transaction(records: list[RoutedResource]) -> bytes:
    """One transaction bundle of PUTs (the bodies the naive loop PUTs)."""
    entries = [
        {
            "resource": orjson.loads(r.resource or "{}"),
            "request": {"method": "PUT", "url": r.target_ref},
        }
        for r in records
    ]
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def _post(conn: http.client.HTTPConnection, path: str, body: bytes) -> dict[str, Any]:
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    payload = response.read()
    if response.status != 200:
        raise RuntimeError(f"ceiling: a bundle was answered {response.status}: {payload[:300]!r}")
    result: dict[str, Any] = orjson.loads(payload)
    return result


def run_ceiling(bench: Bench, data: Dataset, bundle_size: int = 50, name: str = "r2c") -> Throughput:
    """The data set, under fresh ids, stored as transaction bundles of `bundle_size`, one after another."""
    resources = data.resources(bench.namespace(name))
    before, after, _capture = bench.load(resources)
    ordered = in_write_order(bench, before, after)
    expected = {expected_ref(r, bench.site.site) for r in resources}
    parts = urllib.parse.urlsplit(bench.hapi_url)
    conn = http.client.HTTPConnection(parts.hostname or "localhost", parts.port or 80, timeout=300)
    path = parts.path.rstrip("/") or "/"
    bundles = [ordered[i : i + bundle_size] for i in range(0, len(ordered), bundle_size)]
    began = time.time()
    for bundle in bundles:
        answer = _post(conn, path, transaction(bundle))
        statuses = [str((e.get("response") or {}).get("status", "")) for e in answer.get("entry", [])]
        if len(statuses) != len(bundle) or not all(s.startswith(("200", "201")) for s in statuses):
            raise RuntimeError(f"ceiling: a bundle of {len(bundle)} was not stored whole: {statuses[:5]}")
    done = time.time()
    conn.close()
    stored: dict[str, float] = {}
    if not _all_stored(bench.hapi_url, expected, stored):
        raise RuntimeError(f"ceiling: {len(expected) - len(stored)} resources missing at the server")
    return Throughput(
        len(ordered),
        done - began,
        {
            "measured": f"first bundle sent to the last answered; {len(bundles)} transaction bundles of up to "
            f"{bundle_size} PUTs, one at a time, mapped beforehand; no reads, no Provenance, no Kafka",
            "bundle_size": bundle_size,
            "bundles": len(bundles),
        },
    )
