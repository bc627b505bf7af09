"""`cdrsync demo wait`: follow the sync until every source row is at the central CDR, then summarize."""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime

from .config import Config, SiteConfig
from .demo import SourceRow, demo_fhir_keys, expected_targets, percentile, site_dsn, source_rows, type_counts
from .errors import CdrsyncError
from .fhirclient import FhirClient
from .reconcile import dead_letter_reasons
from .settings import Settings
from .tap import tap

__all__ = ["demo_expected", "wait_and_summarize"]


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


def _source_rows(site: SiteConfig, dsn: str, fhir_keys: dict[str, set[tuple[str, str]]]) -> list[SourceRow]:
    """The demo's rows of a site as the resources they are: fhir rows as they are, compositions and messages as
    mapped. Rows the demo did not write (tests, trials) are left out: they are not the demo's to wait for."""
    if site.adapter == "fhir":
        return source_rows(dsn, only=fhir_keys.get(site.site, set()))
    from .demo_sources import adapter_source_rows, demo_source_keys

    return adapter_source_rows(site, dsn, only=demo_source_keys(site))


def demo_expected(settings: Settings, config: Config) -> tuple[dict[str, dict[str, float]], int]:
    """site → (central reference → source commit time) of the rows `demo load` wrote; and how many Patient
    rows wait for a shared identifier."""
    fhir_keys = demo_fhir_keys(lambda name: config.sites[name].resource_types)
    by_site: dict[str, dict[str, float]] = {}
    waiting = 0
    for site in config.source_sites():
        dsn = site_dsn(site, settings.pg_host, settings.pg_port, settings.pg_user, settings.pg_password_value)
        by_site[site.site], no_identifier = expected_targets(site, _source_rows(site, dsn, fhir_keys))
        waiting += no_identifier
    return by_site, waiting


async def wait_and_summarize(settings: Settings, config: Config, *, timeout: float) -> int:
    """Poll the central CDR until all source rows arrived (or timeout); print counts and latency."""
    by_site, waiting = demo_expected(settings, config)
    expected: dict[str, float] = {}
    for rows in by_site.values():
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
    _print_counts(by_site, latencies)
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


def _print_counts(by_site: dict[str, dict[str, float]], arrived: dict[str, float]) -> None:
    """The demo's resources at the central CDR, by type and hospital (a Patient two hospitals share counts at each)."""
    sites = sorted(by_site)
    counts = {site: type_counts(ref for ref in by_site[site] if ref in arrived) for site in sites}
    print(f"{'resource type':24}" + "".join(f"{s:>10}" for s in sites))
    for resource_type in sorted({t for c in counts.values() for t in c}):
        print(f"{resource_type:24}" + "".join(f"{counts[s][resource_type]:>10}" for s in sites))
