"""The one Faust app. Producers use acks=all with idempotence; offsets commit after acknowledgement."""

from __future__ import annotations

import logging
import os
from typing import Any

import faust
from faust.transport.drivers import aiokafka as aiokafka_driver

from pipeline.config import load_config
from pipeline.logs import logging_config
from pipeline.settings import Settings

log = logging.getLogger("cdrsync")


class IdempotentProducer(aiokafka_driver.Producer):
    """Faust enables idempotence only inside transactions; DESIGN.md decision 2 wants it always."""

    def _settings_extra(self) -> Any:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class IdempotentTransport(aiokafka_driver.Transport):
    Producer = IdempotentProducer


class App(faust.App):
    def _new_producer_transport(self) -> Any:
        return IdempotentTransport(self.conf.broker_producer, self)

    def _new_transport(self) -> Any:
        return IdempotentTransport(self.conf.broker_consumer, self)


settings = Settings()
config = load_config(settings.config_root)

app = App(
    os.environ.get("CDRSYNC_APP_ID", "cdrsync"),
    broker=f"kafka://{settings.kafka_bootstrap}",
    store="rocksdb://",
    datadir=str(settings.state_dir),
    web_port=settings.web_port,
    producer_acks=-1,
    producer_max_request_size=16 * 1024 * 1024,  # as the broker's message.max.bytes
    processing_guarantee="at_least_once",
    topic_replication_factor=config.topics.defaults.replication_factor,
    topic_partitions=config.topics.partitions_of("ready"),
    key_serializer="raw",
    value_serializer="raw",
    consumer_auto_offset_reset="earliest",
    broker_commit_every=100,
    broker_commit_interval=1.0,
    table_standby_replicas=0,
    # Faust checks a table's changelog partitions against the consumer's metadata, which aiokafka
    # refreshes every 5 minutes by default: changelogs created at start-up stayed "0 partitions" that long.
    consumer_metadata_max_age_ms=5000,
    web_enabled=True,
    logging_config=logging_config(settings.log_format),
)
