"""Health endpoints, /metrics and the worker's own gauges, on the worker's web port.

/healthz  the process serves requests (Kubernetes liveness)
/readyz   partitions assigned, table recovery finished, every target reachable (readiness); 503 until then
/metrics  cdrsync's metrics (pipeline/metrics.py) and the process' own, for Prometheus

Faust's Prometheus sensor (faust_* metrics) is not installed: it updates several labelled metrics for every
record at every stage, which cost the worker about a fifth of its CPU while it drained a back-load (README
Performance). cdrsync_stage_seconds and cdrsync_stage_batches_total count what each stage took instead.
"""

from __future__ import annotations

import asyncio
import logging
import time

from faust import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from pipeline.fhirclient import FhirClient
from pipeline.metrics import HELD_RECORDS, READY, MemoryCollector, VolumeCollector
from pipeline.observe import Readiness, held_counts

from .app import app, config, settings
from .store import worker_memory
from .topics import held_by_local_patient, parked_by_reference, patient_key_by_local_patient

log = logging.getLogger("cdrsync.web")
_PROBE_EVERY_SECONDS = 10.0
_PROBE_TIMEOUT_SECONDS = 5.0
_REASONS = ("missing_identifier", "identity_review", "reference")
_targets = sorted({route.target for site in config.source_sites() for route in site.routes})
_probe = {"at": 0.0, "reachable": False}

REGISTRY.register(VolumeCollector({"worker-state": settings.state_dir}))
REGISTRY.register(MemoryCollector(lambda: worker_memory(table.data for table in list(app.tables.values()))))


async def _target_status(target: str) -> int:
    async with FhirClient(config.target(target), connections=1) as client:
        try:
            return await asyncio.wait_for(client.probe(), _PROBE_TIMEOUT_SECONDS)
        except TimeoutError:
            return 0


async def _targets_reachable() -> bool:
    """Every target answers its capability statement; probed at most every few seconds."""
    if time.monotonic() - _probe["at"] >= _PROBE_EVERY_SECONDS:
        statuses = await asyncio.gather(*(_target_status(t) for t in _targets))
        _probe["reachable"] = all(200 <= status < 300 for status in statuses)
        _probe["at"] = time.monotonic()
        if not _probe["reachable"]:
            log.warning("target not reachable: %s", dict(zip(_targets, statuses, strict=True)))
    return bool(_probe["reachable"])


def _partitions_assigned() -> bool:
    try:
        return not app.rebalancing and bool(app.consumer.assignment())
    except Exception:  # the consumer is not there yet while the worker starts
        return False


async def readiness() -> Readiness:
    """The worker's readiness now; also exported as cdrsync_ready."""
    state = Readiness(
        partitions_assigned=_partitions_assigned(),
        tables_recovered=bool(app.tables.actives_ready),
        target_reachable=await _targets_reachable(),
    )
    READY.set(1 if state.ready else 0)
    return state


@app.page("/healthz")
async def healthz(self: web.View, request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return self.json({"alive": True})


@app.page("/readyz")
async def readyz(self: web.View, request: web.Request) -> web.Response:
    """Readiness, with each check named in the body."""
    state = await readiness()
    return self.json(state.as_dict(), status=200 if state.ready else 503)


@app.page("/metrics")
async def metrics(self: web.View, request: web.Request) -> web.Response:
    """Prometheus' text format."""
    return self.bytes(generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _under_review(local: str) -> bool:
    return "review" in (patient_key_by_local_patient.get(local) or {})


@app.timer(interval=15.0)
async def update_worker_gauges() -> None:
    """Refresh cdrsync_ready and cdrsync_held_records from this worker's tables."""
    await readiness()
    try:
        counts = await held_counts(
            held_by_local_patient.items(), parked_by_reference.values(), under_review=_under_review
        )
    except Exception:  # a table being recovered or revoked (during the scan too): keep the last values
        log.debug("held records not counted this time", exc_info=True)
        return
    for site in config.source_sites():
        for reason in _REASONS:
            HELD_RECORDS.labels(site.site, reason).set(counts.pop((site.site, reason), 0))
    for (site_name, reason), count in counts.items():
        HELD_RECORDS.labels(site_name, reason).set(count)
