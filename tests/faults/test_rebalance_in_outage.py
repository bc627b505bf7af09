"""A worker holding its writes while the central server is down gives way to a stop or a rebalance.

Faust gives partitions up, or stops, only once every record in processing is acknowledged, and a write held by
the circuit breaker is not, for as long as the outage lasts: the stop waited for the target (or its service
manager's SIGKILL), a rebalance for the target or the broker's session timeout. The hold gives way
(agents/holding.py exit_holding): on a stop the worker exits at once, on a rebalance it exits to be started
again and rejoin, and both workers share the partitions while the target is still down. Once it is back every
change is there exactly once.

The rebalance scenario also caught Faust losing records of a partition a worker took over: it resumes the
partitions before it seeks them to their committed offsets, with its fetcher running, emptied the queues holding
the records handed over meanwhile, and dropped the same records fetched again after the seek as read already
(agents/app.py KeepingFlowControl, GapRefusingConsumer.getmany and perform_seek); whole patients were missing at
the target, nothing in processing, the partition standing still.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from tests.faults.conftest import (
    GROUP,
    SETTINGS,
    Central,
    SiteDatabase,
    Worker,
    Workload,
    assert_clean,
    reconcile,
    settle,
    wait_for,
    worker_behind,
)
from tests.faults.proxy import FaultProxy

pytestmark = pytest.mark.faults
HOLD_GIVEN_UP = b"exiting without acknowledging it (it is read again; this worker, started again, rejoins its group)"


def _log_has(worker: Worker, text: bytes) -> bool:
    return text in worker.log_path.read_bytes()


def _members_with_partitions() -> int:
    """Members of the suite's consumer group that hold at least one partition, once the group is stable."""
    admin = AdminClient({"bootstrap.servers": SETTINGS.kafka_bootstrap})
    group = admin.describe_consumer_groups([GROUP])[GROUP].result(timeout=10)
    if str(group.state) != "ConsumerGroupState.STABLE":
        return 0
    return sum(1 for member in group.members if member.assignment and member.assignment.topic_partitions)


def test_a_worker_joining_during_an_outage_does_not_wait_for_the_target(
    proxy: FaultProxy, stack: Central, site_a: SiteDatabase, run_id: str, tmp_path: Path
) -> None:
    workload = Workload(f"{run_id}-j", patients=16)
    env = {"CENTRAL_FHIR_TIMEOUT_SECONDS": "3", "CDRSYNC_SINK_ATTEMPTS": "2"}
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with worker_behind(proxy, tmp_path / "first", **env) as first:
        workload.load(site_a, workload.transactions(0, 8), pause=0.05)
        proxy.down()
        workload.load(site_a, workload.transactions(8, 8), pause=0.05)
        wait_for(
            lambda: first.metric("cdrsync_target_breaker_open", target="central") == 1,
            timeout=120,
            what="the first worker to hold its writes for the unreachable target",
        )
        with worker_behind(proxy, tmp_path / "second", **env) as second:
            wait_for(
                lambda: first.restarts >= 1 and _log_has(first, HOLD_GIVEN_UP),
                timeout=120,
                what="the first worker to give its hold up at the rebalance and be started again",
            )
            wait_for(
                lambda: _members_with_partitions() == 2,
                timeout=180,
                what="both workers to hold partitions of the group",
            )
            proxy.up()  # only now: the group settled while the target was down
            # Well within the watchdog's stall rule (CDRSYNC_STALL_SECONDS, 120 s): a partition left standing
            # must not be rescued by a restart here.
            settle(stack, workload, timeout=100)
            print(f"\nfirst worker restarts: {first.restarts}, second: {second.restarts}")
    assert_clean(reconcile(stack, workload, dead_refs=set()), "a worker joining while the target is down")


def test_a_worker_stopped_during_an_outage_stops_without_waiting_for_the_target(
    proxy: FaultProxy, stack: Central, site_a: SiteDatabase, run_id: str, tmp_path: Path
) -> None:
    workload = Workload(f"{run_id}-o", patients=4)  # its own ids: -s is the state-loss scenario's
    with worker_behind(proxy, tmp_path, CENTRAL_FHIR_TIMEOUT_SECONDS="3", CDRSYNC_SINK_ATTEMPTS="2") as worker:
        proxy.down()
        workload.load(site_a, workload.transactions(), pause=0.05)
        wait_for(
            lambda: worker.metric("cdrsync_target_breaker_open", target="central") == 1,
            timeout=120,
            what="the worker to hold its writes for the unreachable target",
        )
        worker.stop()  # SIGTERM; Worker.stop kills it if it has not stopped after 60 s
        assert worker.process is not None and worker.process.returncode == 0, "the stop waited for the target"
        assert _log_has(worker, b"but the worker is stopping; exiting without acknowledging it (it is read again)")
        proxy.up()
        worker.start()
        settle(stack, workload, timeout=300)
    assert_clean(reconcile(stack, workload, dead_refs=set()), "a worker stopped while the target is down")
