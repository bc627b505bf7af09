"""The one Faust app. Producers use acks=all with idempotence; offsets commit after acknowledgement."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import faust
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as aiokafka_driver
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

from agents import store as _store  # noqa: F401  (registers the "cdrsync" table store)
from agents.sending import send_now
from pipeline.config import UNKEYED_WARNING, load_config
from pipeline.kafkaadmin import MAX_MESSAGE_BYTES, wait_for_topics
from pipeline.logs import logging_config
from pipeline.settings import Settings

log = logging.getLogger("cdrsync")
_EXIT_SKIPPED = 70


class IdempotentProducer(aiokafka_driver.Producer):
    """Faust enables idempotence only inside transactions; DESIGN.md decision 2 wants it always."""

    def _settings_extra(self) -> Any:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}

    def send_now(self) -> None:
        """Send what is gathered at once instead of after the linger (agents/sending.py)."""
        if self._producer is not None:
            send_now(self._producer)


class ShortPollConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    """Faust fixes the broker's long poll at 1.5 s. With one broker, aiokafka keeps one fetch in flight at a
    time, and a partition whose buffered records were still being processed when it was sent is not in it:
    new records there wait for that poll to end. Each stage could add up to 1.5 s that way. A short poll
    bounds it (CDRSYNC_FETCH_MAX_WAIT_MS); an idle worker only sends more, empty, fetches."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = settings.fetch_max_wait_ms  # read when its fetcher starts
        return consumer

    async def seek_to_committed(self) -> Mapping[Any, int]:
        """Faust seeks every partition back to its committed offset after a rebalance: the records it had
        fetched but not processed are dropped (its streams' queues are cleared) and must be read again."""
        consumer = self._ensure_consumer()
        is_changelog = self.consumer._is_changelog_tp
        return await self.call_thread(
            seek_to_committed_or_reset,
            consumer,
            lambda tp: not is_changelog(tp),
            self.app.conf.consumer_auto_offset_reset,
        )

    async def subscribe(self, topics: Iterable[str]) -> None:
        """Join the group only once the broker lists every topic subscribed to.

        Faust creates the tables' changelog topics just before it subscribes. A broker on a busy machine
        may not list a topic it has just created yet; Faust's assignor then leaves it out ("Ignoring
        missing topic"), the tables have no partitions until the next metadata refresh, and that refresh
        brings a second rebalance in the worker's first seconds, where Faust's fetcher has been seen to
        pass offsets over (GapRefusingConsumer then stops the worker). So a first start used to take a
        restart or two. Waiting here costs nothing once the topics are there.
        """
        wanted = set(topics)
        await self.call_thread(self._until_listed, wanted)
        await super().subscribe(wanted)

    async def _until_listed(self, topics: set[str]) -> None:
        client = self._ensure_consumer()._client
        requests, started = 0, time.monotonic()

        async def listed() -> set[str]:
            nonlocal requests
            requests += 1
            cluster = await client.fetch_all_metadata()
            return {topic for topic in topics if cluster.partitions_for_topic(topic)}

        missing = await wait_for_topics(topics, listed, settings.topic_wait_seconds)
        if not missing and requests > 1:
            log.info(
                "the broker listed all %d topics after %.1f s (%d metadata requests)",
                len(topics),
                time.monotonic() - started,
                requests,
            )
        if missing:
            log.warning(
                "the broker still does not list %s after %d s; joining the group without them (a later "
                "rebalance adds them)",
                ", ".join(missing),
                settings.topic_wait_seconds,
            )


async def seek_to_committed_or_reset(
    consumer: Any, resets: Callable[[Any], bool], policy: str = "earliest"
) -> dict[Any, int | None]:
    """aiokafka's seek_to_committed, and for the partitions it leaves where they are, what it should have done.

    aiokafka seeks a partition only when its committed offset is above 0. A partition the group never
    committed (or committed at 0) keeps its fetch position: after a rebalance, the records fetched there but
    dropped unprocessed would be passed over without a trace (no gap, as nothing was read before them), and
    committed over once later ones are processed. Those partitions (of the ones resets() picks: not the
    changelogs, whose positions recovery sets) go to 0, or, never committed, where the reset policy says.
    Returns the committed offsets, as aiokafka's does.
    """
    committed: dict[Any, int | None] = await consumer.seek_to_committed()
    at_zero = [tp for tp, offset in committed.items() if offset == 0 and resets(tp)]
    for tp in at_zero:
        consumer.seek(tp, 0)
    never = [tp for tp, offset in committed.items() if offset is None and resets(tp)]
    if never:
        await (consumer.seek_to_end(*never) if policy == "latest" else consumer.seek_to_beginning(*never))
    if at_zero or never:
        log.info(
            "sought %d partition(s) committed at 0 to 0 and %d never committed to their %s",
            len(at_zero),
            len(never),
            "end" if policy == "latest" else "start",
        )
    return committed


class GapRefusingConsumer(aiokafka_driver.Consumer):
    """Faust fills a jump in offsets with a "gap" it then commits as if processed (meant for compacted or
    transactional topics, which cdrsync's stream topics are not). After a rebalance its fetcher can hand
    over records from past its read position: the skipped ones would be committed unprocessed, i.e. lost.
    So a gap stops the worker before any commit can include it; the next worker starts at the committed
    offset and reads the skipped records. (Changelog topics are read without acks and never get here.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reported: dict[Any, tuple[int, int]] = {}  # tp → the hole last logged for it

    def _new_consumer_thread(self) -> Any:
        return ShortPollConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[Any, Any]]:
        """Faust's fetched records, each of a stream partition handed over even when it is below the last offset
        handed over there.

        Faust drops a record below its read offset (the last one it handed over) as read already. But after a
        rebalance it resumes the stream partitions before it seeks them to their committed offsets, with its
        fetcher running: records fetched in between are handed over (and were then thrown away with the queues,
        see KeepingFlowControl), moving the read offset past them; the seek then takes the position back, and
        the same records, fetched again while the seek finishes, were dropped. The position was then past them
        and nothing acknowledged after them: the partition stood still with its records unwritten. So such a
        record lowers the read offset and goes on: handled twice at worst, which every stage is built for.
        (Changelog partitions are left to Faust: recovery reads them in order.)
        """
        read = self._read_offset
        async for tp, message in super().getmany(timeout):
            last = read.get(tp)
            if last is not None and message.offset < last and not self._is_changelog_tp(tp):
                log.info(
                    "%s[%d]: offset %d fetched again after the last one handed over (%d); handing it over again",
                    tp.topic,
                    tp.partition,
                    message.offset,
                    last,
                )
                read[tp] = message.offset
            yield tp, message

    async def perform_seek(self) -> None:
        """Faust's seek of every partition to its committed offset after a rebalance, except that a stream
        partition's read offset stays at the last record handed over when that is past the committed offset.

        Faust sets the read offset to the committed offset once the seek is done. But its fetcher runs during
        the seek, and records fetched from the new position are handed over meanwhile: with the read offset set
        back under them, the next record read as a jump over them (_add_gap), and the worker exited and started
        again for records that were handed over and waiting in a queue (seen in the fault suite after table
        recovery, on every few rebalances). The read offset is what was last handed over; a record fetched again
        below it is handed over again (getmany), and one never handed over leaves a hole the commit stops at
        (_new_offset, and the watchdog).
        """
        read = self._read_offset
        committed = await self.seek_to_committed()
        for tp, offset in committed.items():
            sought = offset if offset is not None and offset >= 0 else None
            last = read.get(tp)
            if sought is not None and last is not None and last >= sought and not self._is_changelog_tp(tp):
                continue
            read[tp] = sought
        self._committed_offset.update(
            {faust_consumer.ensure_TP(tp): offset or None for tp, offset in committed.items() if offset is not None}
        )

    def _new_offset(self, tp: Any) -> int | None:
        """The offset to commit for tp: never past a record that was not acknowledged.

        Faust commits the first run of consecutive acknowledged offsets. It checks that the run starts at the
        committed offset, but off by one (the committed offset is the next record to read, so a run starting
        one past it leaves that record out). A record its stream passed over (Faust's streams drop a record
        fetched in an earlier generation or while flow control is suspended, unacknowledged) would then be
        committed over, i.e. lost. So while the acknowledged offsets do not start at the committed one, nothing
        of tp is committed: it stands still, and the watchdog (agents/watchdog.py) restarts the worker, which
        reads again from the committed offset. (A partition the group never committed, or committed at 0, has
        no committed offset here: there, as in Faust, the first run is taken as it is; after a rebalance such a
        partition is read again from its start, see seek_to_committed_or_reset.)
        """
        hole = self._hole(tp)
        if hole is not None:
            committed, first = hole
            if self._reported.get(tp) != hole:
                self._reported[tp] = hole
                log.error(
                    "%s[%d]: offsets %d..%d were not acknowledged but later ones were; not committing past %d "
                    "(the watchdog restarts the worker if they do not come)",
                    tp.topic,
                    tp.partition,
                    committed,
                    first - 1,
                    committed,
                )
            return None
        self._reported.pop(tp, None)
        offset: int | None = super()._new_offset(tp)
        return offset

    def _hole(self, tp: Any) -> tuple[int, int] | None:
        """(committed, first acknowledged) when tp's acknowledged offsets start past its committed one."""
        acked, committed = self._acked.get(tp), self._committed_offset.get(tp)
        if not acked or committed is None:
            return None
        first = min(acked)
        return (committed, first) if first > committed else None

    def holes(self) -> dict[Any, tuple[int, int]]:
        """Every partition with a hole, as _hole gives it (agents/watchdog.py)."""
        return {tp: hole for tp in list(self._acked) if (hole := self._hole(tp)) is not None}

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        log.critical(
            "offsets %d..%d of %s[%d] were passed over by the consumer; exiting before they could be "
            "committed unprocessed (the next worker reads them from the committed offset)",
            offset_from,
            offset_to - 1,
            tp.topic,
            tp.partition,
        )
        os._exit(_EXIT_SKIPPED)


class IdempotentTransport(aiokafka_driver.Transport):
    Producer = IdempotentProducer
    Consumer = GapRefusingConsumer


class KeepingFlowControl(FlowControlEvent):
    """Faust's flow control, except that resuming the flow keeps what the streams' queues hold.

    Faust empties the queues when a rebalance starts (suspend, then clear), rightly: their records may be of
    partitions this worker loses. Mode's flow control also empties them whenever the flow resumes, and Faust
    resumes it once more at the very end of a rebalance, after it has resumed the stream partitions and sought
    them to their committed offsets with its fetcher running: records handed over to the queues by then (its
    read offset moved past them) were thrown away, never handled and never read again. The fault suite's worker
    joining during an outage lost whole patients that way. Records of the new assignment are now kept to be
    handled. The queue of table changelog records (clears_on_resume) is still emptied, as Faust's recovery
    expects.
    """

    def __init__(self, *, clears_on_resume: Callable[[Any], bool], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._clears_on_resume = clears_on_resume

    def resume(self) -> None:
        self._suspend.clear()
        self._resume.set()
        for queue in list(self._queues):
            if self._clears_on_resume(queue):
                queue.clear()


class App(faust.App):
    @cached_property
    def flow_control(self) -> FlowControlEvent:
        """The streams' flow control (KeepingFlowControl)."""
        return KeepingFlowControl(loop=self.loop, clears_on_resume=lambda queue: queue is self.tables.changelog_queue)

    def _new_producer_transport(self) -> Any:
        return IdempotentTransport(self.conf.broker_producer, self)

    def _new_transport(self) -> Any:
        return IdempotentTransport(self.conf.broker_consumer, self)


settings = Settings()
config = load_config(settings.config_root)
if _unkeyed := config.unkeyed_patient_sites():
    log.warning(UNKEYED_WARNING.format(sites=", ".join(_unkeyed)))

app = App(
    os.environ.get("CDRSYNC_APP_ID", "cdrsync"),
    broker=f"kafka://{settings.kafka_bootstrap}",
    store="cdrsync://",  # RocksDB under one memory budget (agents/store.py)
    datadir=str(settings.state_dir),
    web_port=settings.web_port,
    producer_acks=-1,
    producer_max_request_size=MAX_MESSAGE_BYTES,  # as the broker's message.max.bytes
    # A stage sends a batch's outputs without waiting for each, then awaits them all: a few milliseconds
    # of linger make them a few produce requests instead of one per record.
    producer_linger=settings.producer_linger_ms / 1000,
    processing_guarantee="at_least_once",
    topic_replication_factor=config.topics.defaults.replication_factor,
    topic_partitions=config.topics.partitions_of("ready"),
    key_serializer="raw",
    value_serializer="raw",
    consumer_auto_offset_reset="earliest",
    broker_commit_every=100,
    # A worker that died (SIGKILL, or its own exit rather than a loss) holds its partitions until the
    # broker gives up on it; Faust's 60 s default kept a restarted worker waiting that long.
    broker_session_timeout=30.0,
    # A static member (KIP-345) restarted within the session takes its partitions back at once, without a
    # rebalance: after a SIGKILL the worker was back in 2 to 6 s instead of 28 to 33 s. It does not leave the
    # group when it stops, so a worker stopped for good holds its partitions for the session first.
    consumer_group_instance_id=settings.group_instance_id or None,
    broker_heartbeat_interval=3.0,
    broker_commit_interval=1.0,
    table_standby_replicas=0,
    # Faust checks a table's changelog partitions against the consumer's metadata, which aiokafka
    # refreshes every 5 minutes by default: changelogs created at start-up stayed "0 partitions" that long.
    consumer_metadata_max_age_ms=5000,
    web_enabled=True,
    logging_config=logging_config(settings.log_format),
)

#: RocksDB, per table partition. Faust's defaults (64 MiB write buffers, three of them, a 2 GiB block
#: cache and every file kept open, for each of the ~70 table partitions a worker holds) let a worker's
#: memory grow with its state; these bound each partition, and agents/store.py puts all of them under
#: one cache and one write buffer budget (issue 7: RSS from 10k to 100k patients).
ROCKSDB_OPTIONS: dict[str, int] = {
    "write_buffer_size": 2 * 1024 * 1024,
    "max_write_buffer_number": 2,
    "target_file_size_base": 8 * 1024 * 1024,
    "max_open_files": 64,
}
_JSON = faust.Schema(key_serializer="json", value_serializer="json")


def table(name: str, partitions: int) -> Any:
    """A JSON table in RocksDB with the options above (a fresh dict: Faust's store consumes it)."""
    return app.Table(name, partitions=partitions, schema=_JSON, options=dict(ROCKSDB_OPTIONS))
