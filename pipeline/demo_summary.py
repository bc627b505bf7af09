"""`cdrsync demo wait`: follow the sync until every source row is at the central CDR, then summarize."""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime

from .config import Config, SiteConfig
from .demo import SourceRow, expected_targets, percentile, site_dsn, source_rows, type_counts
from .errors import CdrsyncError
from .fhirclient import FhirClient
from .identity import ORIGIN_TAG_SYSTEM
from .reconcile import dead_letter_reasons
from .settings import Settings
from .tap import tap

__all__ = ["wait_and_summarize"]


async def _arrived(client: FhirClient, ref: str, committed: float, gate: asyncio.Semaphore) -> float | None:
    """Seconds from source commit to the target's write of that version, None if not there yet."""
    resource_type, resource_id = ref.split("/", 1)
    async with gate:
        try:
            resource = await client.read(resource_type, resource_id)
        except CdrsyncError:
            return None
    if resource is None:
        return None
    written = datetime.fromisoformat(resource["meta"]["lastUpdated"]).timestamp()
    return written - committed if written >= committed - 0.001 else None


async def _count(client: FhirClient, resource_type: str, site: str) -> int:
    """Resources of one type and origin site at the target (server-side count)."""
    from urllib.parse import quote

    tag = quote(f"{ORIGIN_TAG_SYSTEM}|{site}", safe="")
    path = f"{client.base_url}/{resource_type}?_tag={tag}&_summary=count"
    async with client._session_or_new().get(path) as response:
        body = await response.json(content_type=None)
        return int(body.get("total", 0))


def _source_rows(site: SiteConfig, dsn: str) -> list[SourceRow]:
    """A site's rows as the resources they are: fhir rows as they are, compositions and messages as mapped."""
    if site.adapter == "fhir":
        return source_rows(dsn)
    from .demo_sources import adapter_source_rows

    return adapter_source_rows(site, dsn)


async def wait_and_summarize(settings: Settings, config: Config, *, timeout: float) -> int:
    """Poll the central CDR until all source rows arrived (or timeout); print counts and latency."""
    expected: dict[str, float] = {}
    waiting = 0
    for site in config.source_sites():
        dsn = site_dsn(site, settings.pg_host, settings.pg_port, settings.pg_user, settings.pg_password_value)
        rows, no_identifier = expected_targets(site, _source_rows(site, dsn))
        waiting += no_identifier
        for ref, committed in rows.items():  # a person at two sites is one central Patient
            expected[ref] = max(committed, expected.get(ref, 0.0))
    if waiting:
        print(
            f"{waiting} Patient row(s) have no shared identifier: they and their records are held "
            "(cdrsync tap held) until it is added"
        )
    latencies: dict[str, float] = {}
    gate = asyncio.Semaphore(16)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    live = sys.stdout.isatty()  # one line rewritten in place; in a log, a line each time the figures change
    shown = ""
    async with FhirClient(config.target("central")) as client:
        while True:
            dead = dead_letter_reasons(config, tap(settings.kafka_bootstrap, config.topics.name("dlq"), idle_seconds=1))
            pending = [ref for ref in expected if ref not in latencies]
            results = await asyncio.gather(*(_arrived(client, r, expected[r], gate) for r in pending))
            latencies |= {ref: lat for ref, lat in zip(pending, results, strict=True) if lat is not None}
            accounted = len(latencies) + sum(ref in dead for ref in expected if ref not in latencies)
            line = (
                f"central CDR has {len(latencies)}/{len(expected)} source resources, "
                f"{accounted - len(latencies)} dead-lettered"
            )
            if live:
                print(f"\r{line}", end="", flush=True)
            elif line != shown:
                print(line, flush=True)
            shown = line
            if accounted == len(expected) or loop.time() > deadline:
                break
            await asyncio.sleep(2)
        if live:
            print()
        missing = type_counts(ref for ref in expected if ref not in latencies and ref not in dead)
        for ref in sorted(ref for ref in expected if ref not in latencies and ref in dead):
            print(f"dead letter (ops: cdrsync tap dlq): {ref}: {dead[ref]}")
        await _print_counts(client, config)
    if latencies:
        values = list(latencies.values())
        print(
            f"end-to-end latency (source commit -> central write), {len(values)} resources: "
            f"p50 {percentile(values, 0.5):.2f} s, p95 {percentile(values, 0.95):.2f} s, max {max(values):.2f} s"
        )
    if missing:
        print(f"NOT synced within {timeout:.0f} s: {dict(missing)}", file=sys.stderr)
        return 1
    return 0


async def _print_counts(client: FhirClient, config: Config) -> None:
    sites = [s.site for s in config.source_sites()]
    types = sorted({t for s in config.source_sites() for t in s.resource_types})
    print(f"{'resource type':24}" + "".join(f"{s:>10}" for s in sites))
    for resource_type in types:
        counts = [await _count(client, resource_type, site) for site in sites]
        if any(counts):
            print(f"{resource_type:24}" + "".join(f"{c:>10}" for c in counts))
